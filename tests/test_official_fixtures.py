"""mcpm against the official PyTorch MiniCPM4 code's own outputs (../shared/fixtures)."""
import numpy as np

import mcpm


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def test_logits_match_official(official_case):
    model = mcpm.from_pretrained(official_case / "hf")
    ids = np.load(official_case / "ids.npy")
    ref = np.load(official_case / "logits.npy")
    out = np.asarray(model(ids.astype(np.int32)))
    assert out.shape == ref.shape and out.dtype == np.float32
    assert rel_err(out, ref) < 2e-6


def test_greedy_tokens_match_official(official_case):
    model = mcpm.from_pretrained(official_case / "hf")
    greedy = np.load(official_case / "greedy.npy")
    out = mcpm.generate(model, greedy[:, :9], max_new_tokens=16, temperature=0.0,
                        eos_token_id=-1)
    np.testing.assert_array_equal(out, greedy)


def test_fixture_configs_are_the_interesting_ones(official_case):
    """Guard the premise: one case uses long factors + magnitude scale, the other short ones."""
    from mcpm.model.layers import rope_factors
    model = mcpm.from_pretrained(official_case / "hf")
    cfg = model.config
    factors, s = rope_factors(cfg)
    if cfg.max_position_embeddings > cfg.rope_scaling.original_max_position_embeddings:
        assert factors == cfg.rope_scaling.long_factor and s > 1
        assert cfg.rope_scaling.long_factor != cfg.rope_scaling.short_factor
    else:
        assert factors == cfg.rope_scaling.short_factor and s == 1.0
