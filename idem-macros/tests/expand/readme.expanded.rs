impl Payments {
    /// Charges a card once per idempotency key.
    pub async fn charge(&self, req: ChargeRequest) -> Result<Receipt, PaymentError> {
        let __idem_ok = ::idem_core::__private::ok_type::<Receipt>().storable();
        let __idem_call = ::idem_core::__private::call(::idem_core::__private::site!())
            .key(&(req.idempotency_key.clone()))
            .fingerprint((::idem_core::__private::arg(&req).checked(),))
            .ttl(::idem_core::__private::Duration::from_secs(86400));
        __idem_ok
            .run::<
                PaymentError,
                _,
            >(
                __idem_call,
                ::idem_core::__private::store_arg(&(self.store)).checked(),
                ::idem_core::__private::from_error::<PaymentError>,
                async {
                    #[allow(unused_variables)]
                    let req = req;
                    let receipt = self.gateway.charge(req.card, req.amount).await?;
                    Ok(receipt)
                },
            )
            .await
    }
}
