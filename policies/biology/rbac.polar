# Domain biology: role → permission, and what guests from physics may do here.

permission("member", "read-results");
permission("researcher", "read-results");
permission("researcher", "submit");
permission("researcher", "use-image");
permission("researcher", "cancel");
permission("researcher", "bid");
permission("researcher", "spend");

allow(user: User, action: String, resource) if
    user.domain = "biology" and resource.domain = "biology" and
    role in user.roles and permission(role, action);

allow(user: User, _action: String, resource) if
    user.domain = "biology" and resource.domain = "biology" and "admin" in user.roles;

# Guests: physics researchers (as the inter-domain agreement lets them) submit jobs here,
# use biology's images, and read the results of their own jobs.
allow(user: User, action: String, resource) if
    user.domain = "physics" and "researcher" in user.roles and
    action in ["submit", "use-image"] and resource.domain = "biology";
allow(user: User, "read-results", job: Job) if
    user.domain = "physics" and job.owner = user.name and job.owner_domain = user.domain;

allow(node: Node, "use-image", image: Image) if
    image.domain = "biology" and node.domain in ["biology", "physics"];
