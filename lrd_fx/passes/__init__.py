"""Graph passes; each file holds one pass factory `name(ctx) -> callable(GraphModule) -> PassResult`."""
