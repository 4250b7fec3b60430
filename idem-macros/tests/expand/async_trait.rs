// What `#[async_trait]` hands to `#[idempotent]` inside an `#[async_trait] impl`: the inner
// `async move` block becomes the body of the idempotent call. An argument moved into the body
// (`let order = order;`) and used by the key gets `#[allow(unused_variables)]`: the body need not
// use it.
impl Billing for Biller {
    #[idempotent(key = order.clone(), store = self.store)]
    fn charge<'life0, 'async_trait>(
        &'life0 self,
        order: String,
    ) -> ::core::pin::Pin<Box<dyn ::core::future::Future<Output = Result<Receipt, Error>> + ::core::marker::Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            if let ::core::option::Option::Some(__ret) = ::core::option::Option::None::<Result<Receipt, Error>> {
                #[allow(unreachable_code)]
                return __ret;
            }
            let __self = self;
            let order = order;
            let __ret: Result<Receipt, Error> = { Ok(__self.receipt(order)) };
            #[allow(unreachable_code)]
            __ret
        })
    }
}
