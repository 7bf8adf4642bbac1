# Domain physics' monitoring policy (the MVM paper's): what its nodes measure and report to
# their super-peer, and how often (milliseconds); these override node.polar's defaults.
probe(_node: Node, "load", 1000);
probe(_node: Node, "free_disk", 10000);

# Its scheduling policy, adjusted from each monitoring result: while the group is idle, pack
# jobs onto few nodes so that whole nodes stay free for large jobs; once it is busy, spread
# them. Pack stays until the mean load reaches 0.3 (hysteresis), so that the policy does not
# flap around one value.
scheduling(m: Metrics, "pack") if m.mean_load < 0.2;
scheduling(m: Metrics, "pack") if m.scheduling = "pack" and m.mean_load < 0.3;
scheduling(_m: Metrics, "spread");
