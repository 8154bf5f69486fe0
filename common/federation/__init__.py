"""What crosses the wire between a site and the coordinator: ``reply_schema`` (every key a reply may hold:
adding a metric that centers send starts there), ``wire`` (weights as Flower records) and ``model_io``
(model packages: tensors and plain data, never code)."""
