"""Networks of braingen (``nn.Module``\ s only: no training, no weight loading in constructors),
the one conditioning module, the model-file format (``files``) and the first-stage codec."""
