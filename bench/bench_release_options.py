"""What the release quirks and foresight's variants change: held-out action error after N tiny training steps.

Every variant trains the same tiny action expert (same data, seed, optimiser and steps) and is then
sampled on held-out observations with its own objective's sampler; each figure is printed as a ratio
to the ``release`` baseline (the released recipe, trained in the same run):

- release:            Video_Former_3D + GCDenoiser, top-left causal cross-attention, x*scale+shift,
                      release-edm objective (log-logistic sigmas, DDIM on an exponential schedule);
- cross-attn none:    every action token sees the whole context (the release: action i sees 0..i);
- action positions:   the action tokens get positions (pos_emb; the release never reads it), alone
                      and with cross-attn none;
- one-plus-scale:     AdaLN modulation x*(1+scale)+shift;
- proprio token:      the robot state joins the context (the release never reads it);
- objective edm:      lognormal sigmas + Karras Euler sampler (foresight's earlier objective);
- foresight:          Uni-Perceiver + DiffusionPolicy + edm (foresight's earlier recipe).

The decoupler's variant (learned position embeddings) is measured the same way on a decoupler task.

Synthetic data: a per-sample latent shown in every token (plus token noise) sets every action of the
chunk through a fixed random map, plus a term from the robot state; so the action at chunk position
0 depends on the observation, which the top-left causal mask hides from it (it sees only the goal
token), and a part of every action depends on the state, which only the proprio variant reads.

    python bench/bench_release_options.py --steps 600 --seeds 3 [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from foresight.trainers.models.decoupler import Decoupler, DecouplerConfig  # noqa: E402
from foresight.trainers.models.denoiser import DenoiserConfig  # noqa: E402
from foresight.trainers.models.objectives import ObjectiveConfig  # noqa: E402
from foresight.trainers.models.policy import ActionExpert, PolicyConfig  # noqa: E402
from foresight.trainers.models.uniperceiver import UniPerceiverConfig  # noqa: E402
from foresight.trainers.models.video_former import VideoFormerConfig  # noqa: E402

T, N, C, GOAL, STATE, CHUNK, ACT, LATENT = 4, 9, 24, 8, 3, 6, 3, 4


def make_data(n: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    maps = torch.Generator().manual_seed(1234)  # the task itself is fixed across splits
    to_tokens = torch.randn(LATENT, C, generator=maps)
    w_obs = torch.randn(LATENT, CHUNK * ACT, generator=maps) / LATENT**0.5
    w_state = torch.randn(STATE, CHUNK * ACT, generator=maps) / STATE**0.5
    latent = torch.randn(n, LATENT, generator=gen)  # what the observation shows, in every token
    tokens = 0.5 * torch.randn(n, T, N, C, generator=gen) + (latent @ to_tokens)[:, None, None]
    state = torch.randn(n, STATE, generator=gen)
    goal = torch.randn(n, GOAL, generator=gen)
    actions = latent @ w_obs + 0.5 * state @ w_state
    return {"tokens": tokens, "goal": goal, "state": state, "actions": actions.view(n, CHUNK, ACT)}


def expert(variant: str) -> ActionExpert:
    if variant == "foresight":
        perceiver = UniPerceiverConfig.preset("tiny", in_channels=C, frames=T)
        policy = PolicyConfig.preset("tiny", action_dim=ACT, chunk=CHUNK, text_dim=GOAL, dropout=0.0,
                                     cond_tokens=perceiver.num_latents, cond_dim=perceiver.dim)
        return ActionExpert(perceiver, policy, ObjectiveConfig.for_kind("edm"))
    former = VideoFormerConfig.preset("tiny", in_channels=C, frames=T)
    options = {"cross-attn none": {"cross_attn_mask": "none"},
               "cross-attn none + action positions": {"cross_attn_mask": "none", "action_positions": "pos_emb"},
               "action positions": {"action_positions": "pos_emb"},
               "one-plus-scale": {"modulation": "one-plus-scale"},
               "proprio token": {"proprio": "token"}}.get(variant, {})
    denoiser = DenoiserConfig.preset("tiny", action_dim=ACT, chunk=CHUNK, goal_dim=GOAL, obs_dim=former.dim,
                                     cond_tokens=former.num_latents, proprio_dim=STATE, attn_pdrop=0.0,
                                     resid_pdrop=0.0, mlp_pdrop=0.0, **options)
    kind = "edm" if variant == "objective edm" else "release-edm"
    # Sampling down to the training yaml's 0.001 (not CALVIN's evaluation 1.0): a tiny fit is judged on detail.
    return ActionExpert(former, denoiser, ObjectiveConfig.for_kind(kind, **({"sample_sigma_min": 0.001}
                                                                            if kind == "release-edm" else {})))


def train_and_eval(variant: str, steps: int, seed: int, train: dict, held_out: dict,
                   device: torch.device) -> tuple[float, float]:
    torch.manual_seed(seed)
    model = expert(variant).to(device)
    proprio = model.reads_proprio
    optim = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(train["tokens"]), (32,), generator=gen).to(device)
        loss = model(train["tokens"][idx], train["goal"][idx], train["actions"][idx], None,
                     train["state"][idx] if proprio else None)
        optim.zero_grad()
        loss.backward()
        optim.step()
    model.eval()
    pred = model.predict(held_out["tokens"], held_out["goal"], torch.Generator().manual_seed(0),
                         held_out["state"] if proprio else None)
    err = (pred - held_out["actions"]) ** 2
    return float(err.mean()), float(err[:, 0].mean())


def decoupler_mse(position_embeddings: bool, steps: int, seed: int, device: torch.device) -> float:
    """Held-out MSE of a tiny decoupler on targets with a fixed per-location pattern."""
    torch.manual_seed(seed)
    cfg = DecouplerConfig.preset("tiny", in_channels=16, teacher_channels=8, frames=4, height=4, width=4,
                                 dropout=0.0, position_embeddings=position_embeddings)
    model = Decoupler(cfg).to(device)
    maps = torch.Generator().manual_seed(99)
    weight, pattern = torch.randn(16, 8, generator=maps) / 4, torch.randn(1, 4, 4, 4, 8, generator=maps)

    def batch(n: int, gen: torch.Generator) -> tuple:
        feats, ref = torch.randn(n, 4, 4, 4, 16, generator=gen), torch.randn(n, 1, 4, 4, 8, generator=gen)
        return tuple(t.to(device) for t in (feats, ref, feats @ weight + 0.5 * ref + pattern))

    optim = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        feats, ref, target = batch(16, gen)
        loss = torch.nn.functional.mse_loss(model(feats, ref), target)
        optim.zero_grad()
        loss.backward()
        optim.step()
    feats, ref, target = batch(64, torch.Generator().manual_seed(10_000))
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model.eval()(feats, ref), target))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    train, held_out = ({k: v.to(device) for k, v in make_data(n, seed).items()} for n, seed in ((1024, 1), (256, 2)))
    variants = ["release", "cross-attn none", "cross-attn none + action positions", "action positions",
                "one-plus-scale", "proprio token", "objective edm", "foresight"]
    results = {v: [train_and_eval(v, args.steps, s, train, held_out, device) for s in range(args.seeds)]
               for v in variants}
    base_all = statistics.median(r[0] for r in results["release"])
    base_first = statistics.median(r[1] for r in results["release"])
    print(f"action expert, {args.steps} steps, median of {args.seeds} seeds; held-out sampled-action MSE "
          f"(ratio to release); predicting zeros gives {float((held_out['actions'] ** 2).mean()):.4f}\n")
    print("| variant | MSE, all chunk positions | MSE, chunk position 0 |\n|---|---|---|")
    for variant, runs in results.items():
        all_mse, first = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        print(f"| {variant} | {all_mse:.4f} ({all_mse / base_all:.2f}x) | {first:.4f} ({first / base_first:.2f}x) |")
    release = statistics.median(decoupler_mse(False, args.steps, s, device) for s in range(args.seeds))
    variant = statistics.median(decoupler_mse(True, args.steps, s, device) for s in range(args.seeds))
    print(f"\ndecoupler, {args.steps} steps: held-out MSE release {release:.4f}; with position embeddings "
          f"{variant:.4f} ({variant / release:.2f}x)")


if __name__ == "__main__":
    main()
