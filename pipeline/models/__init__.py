"""Networks of braingen; each module holds ``nn.Module``s only (no training, no weight loading)."""
