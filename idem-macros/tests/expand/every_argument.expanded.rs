pub(crate) async fn charge(
    client: &Client,
    tenant: &str,
    order: Order,
) -> Result<Receipt, Declined> {
    let __idem_ok = my_app::idem::__private::ok_type::<Receipt>().storable();
    let __idem_err = my_app::idem::__private::err_type::<Declined>().storable();
    let __idem_call = my_app::idem::__private::call(
            my_app::idem::__private::site!("billing::charge"),
        )
        .key(&(order.id))
        .fingerprint((
            my_app::idem::__private::arg(&tenant).checked(),
            my_app::idem::__private::arg(&order).checked(),
        ))
        .scope(&(tenant))
        .ttl(my_app::idem::__private::Duration::from_secs(604800))
        .lease(my_app::idem::__private::Duration::from_millis(500))
        .wait_timeout(Duration::from_secs(3))
        .on_conflict(my_app::idem::__private::OnConflict::Wait)
        .version(2)
        .missing_key(my_app::idem::__private::MissingKey::Run)
        .fail_open(true);
    __idem_ok
        .run_storing_errors::<
            Declined,
            _,
            _,
        >(
            __idem_err,
            __idem_call,
            my_app::idem::__private::store_arg(&(STORE.clone())).checked(),
            async {
                let client = client;
                #[allow(unused_variables)]
                let tenant = tenant;
                #[allow(unused_variables)]
                let order = order;
                client.charge(&order).await
            },
        )
        .await
}
