impl Billing for Biller {
    fn charge<'life0, 'async_trait>(
        &'life0 self,
        order: String,
    ) -> ::core::pin::Pin<
        Box<
            dyn ::core::future::Future<
                Output = Result<Receipt, Error>,
            > + ::core::marker::Send + 'async_trait,
        >,
    >
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            let __idem_ok = ::idem_core::__private::ok_type::<Receipt>().storable();
            let __idem_call = ::idem_core::__private::call(
                    ::idem_core::__private::site!(),
                )
                .key(&(order.clone()))
                .fingerprint((::idem_core::__private::arg(&order).checked(),));
            __idem_ok
                .run::<
                    Error,
                    _,
                >(
                    __idem_call,
                    ::idem_core::__private::store_arg(&(self.store)).checked(),
                    ::idem_core::__private::from_error::<Error>,
                    async {
                        if let ::core::option::Option::Some(__ret) = ::core::option::Option::None::<
                            Result<Receipt, Error>,
                        > {
                            #[allow(unreachable_code)] return __ret;
                        }
                        let __self = self;
                        #[allow(unused_variables)]
                        let order = order;
                        let __ret: Result<Receipt, Error> = {
                            Ok(__self.receipt(order))
                        };
                        #[allow(unreachable_code)] __ret
                    },
                )
                .await
        })
    }
}
