impl Orders {
    async fn place(&self, order: Order) -> Result<i64, Error> {
        let __idem_ok = ::idem_core::__private::ok_type::<i64>().storable();
        let __idem_store = ::idem_core::__private::tx_store(&(self.db)).checked();
        let __idem_call = ::idem_core::__private::call(::idem_core::__private::site!())
            .key(&(order.id))
            .fingerprint((::idem_core::__private::arg(&order).checked(),));
        __idem_ok
            .run_in_transaction::<
                Error,
                _,
                _,
            >(
                __idem_call,
                __idem_store,
                ::idem_core::__private::from_error::<Error>,
                async |tx| {
                    let id = insert(&mut **tx, &order).await?;
                    Ok(id)
                },
            )
            .await
    }
}
async fn debit(
    store: &SqliteStore,
    tx: &mut SqliteTx,
    order: Order,
) -> Result<i64, Error> {
    let __idem_ok = ::idem_core::__private::ok_type::<i64>().storable();
    let __idem_store = ::idem_core::__private::tx_store(&(store)).checked();
    let __idem_tx = ::idem_core::__private::tx_arg(__idem_store, tx);
    let __idem_call = ::idem_core::__private::call(::idem_core::__private::site!())
        .key(&(order.id))
        .fingerprint((::idem_core::__private::arg(&order).checked(),));
    __idem_ok
        .run_within::<
            Error,
            _,
            _,
        >(
            __idem_call,
            __idem_store,
            ::idem_core::__private::from_error::<Error>,
            __idem_tx,
            async |tx| { insert(&mut **tx, &order).await },
        )
        .await
}
