"""ClientApp: one hospital's local training and validation; only weights and metrics leave."""
