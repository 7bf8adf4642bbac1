# Inter-domain policy: what principals of one domain may do to resources of another.
# Consulted only when the two domains differ; the resource's own domain policy must allow too.
# Deny is the default: a pair of domains without a rule here does not share anything.

# The physics–biology agreement: physics researchers may run jobs in biology's groups, on
# biology's images, and read the results of the jobs they own there.
allow(user: User, action: String, resource) if
    user.domain = "physics" and resource.domain = "biology" and
    "researcher" in user.roles and
    action in ["submit", "use-image"];

allow(user: User, "read-results", job: Job) if
    user.domain = "physics" and job.domain = "biology" and
    job.owner = user.name and job.owner_domain = user.domain;

# The super-peers of the two domains may fetch each other's images for the jobs they place.
allow(node: Node, "use-image", image: Image) if
    "superpeer" in node.roles and
    node.domain in ["physics", "biology"] and image.domain in ["physics", "biology"];
