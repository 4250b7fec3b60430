// The README's example.
impl Payments {
    /// Charges a card once per idempotency key.
    #[idempotent(key = req.idempotency_key.clone(), ttl = "24h", store = self.store)]
    pub async fn charge(&self, req: ChargeRequest) -> Result<Receipt, PaymentError> {
        let receipt = self.gateway.charge(req.card, req.amount).await?;
        Ok(receipt)
    }
}
