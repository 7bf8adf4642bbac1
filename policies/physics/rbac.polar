# Domain physics: role → permission. A user's roles come from its certificate
# (`mvm ca issue user --roles ...`, signed by the physics CA).

permission("member", "read-results");
permission("researcher", "read-results");
permission("researcher", "submit");
permission("researcher", "use-image");
permission("researcher", "cancel");
permission("researcher", "bid");
permission("researcher", "spend");

# Members of physics act on physics resources by their roles' permissions.
allow(user: User, action: String, resource) if
    user.domain = "physics" and resource.domain = "physics" and
    role in user.roles and permission(role, action);

# Admins of physics may do anything in physics, including administer it.
allow(user: User, _action: String, resource) if
    user.domain = "physics" and resource.domain = "physics" and "admin" in user.roles;

# Nodes of physics fetch its images for the jobs they run.
allow(node: Node, "use-image", image: Image) if
    node.domain = "physics" and image.domain = "physics";
