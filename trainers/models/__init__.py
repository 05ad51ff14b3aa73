"""The S-VAM networks: decouplers, the video former and UniPerceiver aggregator, the policy and its
denoiser, layers and objectives (trainers use them; nothing here reads or writes a store)."""
