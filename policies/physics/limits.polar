# Domain physics: resource-sharing limits, on what one user holds at once in the domain
# (this job plus the user's running ones). The smallest applicable bound holds; a user with
# no bound (an admin) is not limited.
limit(user: User, "vcpus", 16) if "researcher" in user.roles and not "admin" in user.roles;
limit(user: User, "memory_mib", 32768) if "researcher" in user.roles and not "admin" in user.roles;
limit(user: User, "vertices", 64) if "researcher" in user.roles and not "admin" in user.roles;
