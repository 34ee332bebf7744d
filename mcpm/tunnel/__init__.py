"""ModelTunnel v2 (training spec section 2): muP proxy searches, the lr-transfer check, a
ScalingBench-style indicator, and scaling-law fits from WSD branch decays."""
