"""Graph passes: one file per pass factory `name(ctx) -> callable(GraphModule) -> PassResult`; gates.py holds
the gate graph transforms (gate_node, ungate_graph, strip_gates) the freeze pass and fuse share."""
