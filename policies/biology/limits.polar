# Domain biology: its own researchers get more than guests from physics.
limit(user: User, "vcpus", 32) if user.domain = "biology" and not "admin" in user.roles;
limit(user: User, "vertices", 128) if user.domain = "biology" and not "admin" in user.roles;
limit(user: User, "vcpus", 4) if user.domain = "physics";
limit(user: User, "memory_mib", 4096) if user.domain = "physics";
limit(user: User, "vertices", 16) if user.domain = "physics";
