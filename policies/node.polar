# Node-level defaults: every node that takes its policies from this directory applies them
# before it instantiates a job's vertices.

# Who a node runs jobs for: users of its own domain, and physics researchers on biology's
# nodes (the inter-domain agreement).
allow(user: User, "run", node: Node) if user.domain = node.domain;
allow(user: User, "run", node: Node) if
    user.domain = "physics" and node.domain = "biology" and "researcher" in user.roles;

# The queue kinds and codecs a job's channels may use on a node, and the most queues one
# job may create on one node. A setting not stated here does not restrict.
queue_kind("fifo");
queue_kind("priority");
codec("raw");
codec("json");
codec("cbor");
codec("postcard");
codec("zstd+raw");
codec("zstd+json");
codec("zstd+cbor");
codec("zstd+postcard");
max_queues(256);

# The monitoring policy's defaults: the probes every node runs and reports to its super-peer
# with its heartbeats, and how often (milliseconds). A domain's own `probe(node, NAME, MS)`
# rules override them (0 turns one off).
probe("load", 2000);
probe("free_memory", 5000);
probe("vertices", 1000);
probe("queue_depth", 1000);
probe("backlog", 2000);
