async fn send_email(
    store: &MemoryStore,
    db: &Pool,
    to: String,
    template: u32,
) -> Result<(), Error> {
    let __idem_ok = ::idem_core::__private::ok_type::<()>().storable();
    let __idem_call = ::idem_core::__private::call(::idem_core::__private::site!())
        .key((
            ::idem_core::__private::arg(&to).checked(),
            ::idem_core::__private::arg(&template).checked(),
        ));
    __idem_ok
        .run::<
            Error,
            _,
        >(
            __idem_call,
            ::idem_core::__private::store_arg(&(store)).checked(),
            ::idem_core::__private::from_error::<Error>,
            async {
                let db = db;
                #[allow(unused_variables)]
                let to = to;
                #[allow(unused_variables)]
                let template = template;
                db.log(&to, template).await?;
                Ok(())
            },
        )
        .await
}
