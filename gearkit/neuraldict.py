"""NeuralDict: train CSR dictionaries on KV vectors of calibration text, with Lightning.

1. `collect_kv` runs the model over calibration text with a `DynamicCache` and reads every layer's keys and
   values from it (public API); keys are taken back to before RoPE with the model's own rotary parameters.
2. `kmeans_init` seeds each dictionary with spherical k-means centroids of its vectors.
3. `NeuralDict` (a `LightningModule`) trains the dictionaries of all layer groups of one role at once, batched:
   loss = MSE(x, D · MP(x, D)) + β · ‖I − DᵀD‖²_F / N², with β set each step so the diversity term is
   `diversity` times the MSE; the atoms are re-normalised to unit columns after every optimizer step
   (`on_train_batch_end`). `lightning.Trainer.fit` runs it: progress bar, checkpoints, validation loss.
4. `train_dictionaries` ties it together into a `DictionarySet`; `train_default_dictionary` trains the default
   (default model, default text) once and saves it where `gearkit.csr.default_dictionary` reads it.

Each group's vectors are divided by their RMS before training: Matching Pursuit is scale-equivariant, so this
changes no optimum but weighs the groups equally (the MSE is then relative to each group's energy).
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from gearkit.compressors.dictionary_set import DictionarySet, model_signature
from gearkit.compressors.rope import RoPE
from gearkit.compressors.solvers import SOLVERS, combine_atoms
from gearkit.csr import DEFAULT_DICTIONARY, default_dictionary_path
from gearkit.models import token_windows

DEFAULT_ATOMS = DEFAULT_DICTIONARY["atoms"]
DEFAULT_SPARSITY = DEFAULT_DICTIONARY["sparsity"]
DEFAULT_GROUP_LAYERS = DEFAULT_DICTIONARY["group_layers"]
DEFAULT_VECTORS = 12288
DEFAULT_EPOCHS = 4


@torch.inference_mode()
def collect_kv(
    model, tokenizer, text: str, tokens: int = 1024, windows: int = 4, pre_rope: bool = True
) -> tuple[Tensor, Tensor]:
    """Keys and values of every layer for windows of `text`, read from a `DynamicCache` the model fills.

    Args:
        model: a `transformers` causal LM with rotary position embedding.
        tokenizer: its tokenizer.
        text: calibration text.
        tokens: tokens per window (each window starts at position 0).
        windows: at most this many consecutive windows.
        pre_rope: undo RoPE on the keys (with `RoPE.from_model(model)`).

    Returns:
        `(keys, values)`: float32 `[layers, vectors, head_dim]`, vectors = windows × kv_heads × tokens.
    """
    from transformers import DynamicCache

    spans = token_windows(tokenizer, text, tokens, 1, windows)
    rotary = RoPE.from_model(model) if pre_rope else None
    keys, values = [], []
    for window in spans:
        cache = DynamicCache(config=model.config)
        model(window[None, :tokens], cache=cache, use_cache=True)
        positions = torch.arange(tokens)[None]
        k = [rotary.undo(layer.keys, positions) if rotary else layer.keys.float() for layer in cache.layers]
        keys.append(torch.stack([t[0].reshape(-1, t.shape[-1]) for t in k]))
        values.append(
            torch.stack([layer.values[0].float().reshape(-1, layer.values.shape[-1]) for layer in cache.layers])
        )
    return torch.cat(keys, 1), torch.cat(values, 1)


def layer_groups(layers: int, size: int) -> tuple[tuple[int, ...], ...]:
    """Groups of `size` adjacent layers (the last may be smaller): `layer_groups(5, 2) == ((0, 1), (2, 3), (4,))`."""
    if size < 1:
        raise ValueError(f"group size must be at least 1, got {size}")
    return tuple(tuple(range(i, min(i + size, layers))) for i in range(0, layers, size))


def group_vectors(per_layer: Tensor, groups: Sequence[Sequence[int]], chunks: int, count: int, seed: int = 0) -> Tensor:
    """`count` random vectors per group, each layer's vectors cut into `chunks` slices.

    Args:
        per_layer: `[layers, n, head_dim]`.
        groups: layers per group.
        chunks: slices per vector `s_n`.
        count: vectors per group (all if fewer).

    Returns:
        `[groups, count, head_dim / chunks]`.
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for g in groups:
        pool = per_layer[list(g)].reshape(-1, per_layer.shape[-1] // chunks)
        out.append(pool[torch.randperm(pool.shape[0], generator=gen)[: min(count, pool.shape[0])]])
    n = min(t.shape[0] for t in out)
    return torch.stack([t[:n] for t in out])


def unit_columns(atoms: Tensor) -> Tensor:
    """`atoms` `[..., dim, atoms]` with each column scaled to unit norm."""
    return atoms / atoms.norm(dim=-2, keepdim=True).clamp_min(1e-12)


def kmeans_init(x: Tensor, atoms: int, iters: int = 8, seed: int = 0) -> Tensor:
    """Spherical k-means (cosine, sign-blind: a vector joins the centroid of largest |cos|) per group.

    Args:
        x: `[groups, n, dim]` vectors.
        atoms: centroids per group (at most `n`).
        iters: Lloyd iterations.

    Returns:
        `[groups, dim, atoms]` unit-norm columns.
    """
    g, n, d = x.shape
    if atoms > n:
        raise ValueError(f"k-means needs at least as many vectors as atoms: {n} vectors, {atoms} atoms")
    gen = torch.Generator().manual_seed(seed)
    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    centroids = unit_columns(torch.stack([unit[k, torch.randperm(n, generator=gen)[:atoms]] for k in range(g)]).mT)
    for _ in range(iters):
        corr = unit @ centroids  # [g, n, atoms]
        best = corr.abs().argmax(-1)
        signed = unit * corr.gather(-1, best[..., None]).sign()
        sums = torch.zeros(g, atoms, d).scatter_add_(1, best[..., None].expand(-1, -1, d), signed)
        empty = sums.norm(dim=-1) == 0  # an empty cluster keeps its centroid
        centroids = torch.where(empty[:, None], centroids, unit_columns(sums.mT))
    return centroids


class NeuralDict(pl.LightningModule):
    """Dictionaries for several layer groups, trained together (each group's only on its own vectors).

    Batches are `(x,)` with `x` `[batch, groups, dim]`. Loss per step:
    `MSE(x, D · MP(x, D)) + β · ‖I − DᵀD‖²_F / N²` (means over groups; `N` atoms), with
    `β = diversity · MSE / diversity_term` (detached), so the diversity term stays that fraction of the MSE.

    Args:
        init: `[groups, dim, atoms]` initial dictionaries (e.g. from `kmeans_init`).
        sparsity: atoms per vector in the MP code `s`.
        lr: Adam learning rate.
        diversity: the diversity term as a fraction of the MSE.
        solver: `"mp"` or `"omp"` for the code in the loss.
    """

    def __init__(self, init: Tensor, sparsity: int, lr: float = 2e-3, diversity: float = 0.1, solver: str = "mp"):
        super().__init__()
        if init.dim() != 3:
            raise ValueError(f"init must be [groups, dim, atoms], got shape {tuple(init.shape)}")
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; known: {', '.join(SOLVERS)}")
        self.atoms = nn.Parameter(unit_columns(init.detach().float().clone()))
        self.sparsity, self.lr, self.diversity, self.solver = sparsity, lr, diversity, solver
        self.save_hyperparameters(ignore=["init"])

    def loss_terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """`(mse, diversity_term)` for `x` `[batch, groups, dim]`."""
        x = x.transpose(0, 1)  # [groups, batch, dim]
        index, coef = SOLVERS[self.solver](x, self.atoms, self.sparsity)
        mse = (x - combine_atoms(index, coef, self.atoms)).pow(2).mean()
        n = self.atoms.shape[-1]
        eye = torch.eye(n, device=x.device)
        div = (eye - self.atoms.mT @ self.atoms).pow(2).sum((-2, -1)).mean() / n**2
        return mse, div

    def training_step(self, batch, batch_idx: int) -> Tensor:
        mse, div = self.loss_terms(batch[0])
        beta = self.diversity * mse.detach() / div.detach().clamp_min(1e-12)
        loss = mse + beta * div
        self.log_dict({"train_mse": mse, "train_loss": loss}, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        mse, _ = self.loss_terms(batch[0])
        self.log("val_mse", mse, prog_bar=True, on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        with torch.no_grad():
            self.atoms.copy_(unit_columns(self.atoms))

    @torch.no_grad()
    def held_out_mse(self, x: Tensor) -> float:
        """Reconstruction MSE through the code on `x` `[n, groups, dim]`."""
        return self.loss_terms(x)[0].item()


def fit(
    vectors: Tensor,
    atoms: int,
    sparsity: int,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = 512,
    lr: float = 2e-3,
    diversity: float = 0.1,
    validation: float = 0.1,
    root: str | Path | None = None,
    progress: bool = True,
    seed: int = 0,
    callbacks: Sequence[Callback] = (),
) -> tuple[Tensor, dict]:
    """Train one dictionary per group with `Trainer.fit` (k-means init, then NeuralDict).

    Args:
        vectors: `[groups, n, dim]`.
        atoms: atoms per dictionary.
        sparsity: MP atoms per vector in the loss.
        epochs: training epochs.
        batch_size: vectors per group per step.
        lr: Adam learning rate.
        diversity: diversity term as a fraction of the MSE.
        validation: fraction of vectors held out for `val_mse`.
        root: Lightning's `default_root_dir` (checkpoints, CSV logs); None: a temporary directory.
        progress: show Lightning's progress bar.
        seed: seeds the split, the k-means init and the shuffling.
        callbacks: extra Lightning callbacks.

    Returns:
        `([groups, dim, atoms] unit-norm dictionaries, stats)` with the held-out relative MSE before (k-means)
        and after training (`mse_init`, `mse_trained`) and `seconds`.
    """
    start = time.perf_counter()
    rms = vectors.pow(2).mean((1, 2), keepdim=True).sqrt().clamp_min(1e-12)
    x = (vectors / rms).transpose(0, 1).contiguous()  # [n, groups, dim]
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(x.shape[0], generator=gen)
    held = max(1, int(validation * x.shape[0]))
    train, val = x[order[held:]], x[order[:held]]
    module = NeuralDict(kmeans_init(train.transpose(0, 1), atoms, seed=seed), sparsity, lr, diversity)
    before = module.held_out_mse(val)
    tmp = None if root is not None else tempfile.TemporaryDirectory(prefix="gearkit-neuraldict-")
    root = Path(root if root is not None else tmp.name)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        default_root_dir=root,
        logger=CSVLogger(root, name="neuraldict"),
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        callbacks=list(callbacks),
        deterministic=False,
    )
    pl.seed_everything(seed, verbose=False)
    loader = DataLoader(TensorDataset(train), batch_size=batch_size, shuffle=True, generator=gen)
    trainer.fit(module, loader, DataLoader(TensorDataset(val), batch_size=4 * batch_size))
    after = module.held_out_mse(val)
    if tmp is not None:
        tmp.cleanup()
    return module.atoms.detach().clone(), {
        "mse_init": before,
        "mse_trained": after,
        "seconds": time.perf_counter() - start,
    }


def train_dictionaries(
    model,
    tokenizer,
    text: str,
    model_name: str,
    atoms: int = DEFAULT_ATOMS,
    sparsity: int = DEFAULT_SPARSITY,
    group_layers: int = DEFAULT_GROUP_LAYERS,
    vectors: int = DEFAULT_VECTORS,
    epochs: int = DEFAULT_EPOCHS,
    tokens: int = 1024,
    windows: int = 4,
    pre_rope: bool = True,
    root: str | Path | None = None,
    progress: bool = True,
    log=None,
) -> tuple[DictionarySet, dict]:
    """Key and value dictionaries for every layer group of `model`, trained on KV vectors of `text`.

    Keys: one vector per (token, head), `sparsity` atoms (`s_n = 1`); values: each half of a vector, with
    `sparsity / 2` atoms (`s_n = 2`), as the CSR recipes code them.

    Args:
        model: a `transformers` causal LM with RoPE.
        tokenizer: its tokenizer.
        text: calibration text.
        model_name: recorded in the metadata.
        atoms: atoms per dictionary.
        sparsity: key atoms per vector `s` (even).
        group_layers: adjacent layers sharing a dictionary.
        vectors: training vectors per group and role.
        epochs: NeuralDict epochs.
        tokens: tokens per calibration window.
        windows: calibration windows.
        pre_rope: train key dictionaries on pre-RoPE keys (then the set carries the rotary parameters).
        root: Lightning directory (checkpoints and logs under `root/keys`, `root/values`); None: temporary.
        progress: show progress bars.
        log: a callable for progress lines (default: print to stderr).

    Returns:
        `(dictionary set, stats)`: stats has per role the held-out relative MSE before/after and seconds, plus
        `collect_seconds` and `seconds` in total.
    """
    if sparsity < 2 or sparsity % 2:
        raise ValueError(f"sparsity must be an even int >= 2 (values take sparsity / 2 per half), got {sparsity}")
    log = log or (lambda msg: print(msg, file=sys.stderr))
    start = time.perf_counter()
    keys, values = collect_kv(model, tokenizer, text, tokens, windows, pre_rope)
    stats = {"collect_seconds": time.perf_counter() - start}
    groups = layer_groups(keys.shape[0], group_layers)
    log(
        f"NeuralDict: {keys.shape[1]} key/value vectors per layer in {time.perf_counter() - start:.1f} s; "
        f"{len(groups)} groups of {group_layers} layers, {atoms} atoms, s={sparsity}"
    )
    trained = {}
    for role, per_layer, chunks, s in (("keys", keys, 1, sparsity), ("values", values, 2, sparsity // 2)):
        data = group_vectors(per_layer, groups, chunks, vectors)
        sub = None if root is None else Path(root) / role
        trained[role], stats[role] = fit(data, atoms, s, epochs, root=sub, progress=progress)
        log(
            f"NeuralDict {role}: held-out relative MSE {stats[role]['mse_init']:.4f} (k-means) -> "
            f"{stats[role]['mse_trained']:.4f} in {stats[role]['seconds']:.1f} s"
        )
    stats["seconds"] = time.perf_counter() - start
    rope = RoPE.from_model(model) if pre_rope else None
    meta = {"name": model_name, **model_signature(model.config)}
    return DictionarySet(trained["keys"], trained["values"], groups, 1, 2, rope, meta, (sparsity, sparsity // 2)), stats


def train_default_dictionary(force: bool = False) -> Path:
    """Train the default CSR dictionary (default model, default text, default sizes; a few minutes on a CPU,
    progress on stderr) and save it where `gearkit.csr.default_dictionary` reads it; nothing to do when it
    is there already (unless `force`). Returns its path."""
    path = default_dictionary_path()
    if path.is_file() and not force:
        return path
    from gearkit.models import DEFAULT_MODEL, DEFAULT_TEXT, load_default_model, load_text

    print(f"training the default CSR dictionary once (cached at {path}) ...", file=sys.stderr)
    model, tokenizer = load_default_model()
    dictionaries, stats = train_dictionaries(model, tokenizer, load_text(DEFAULT_TEXT), DEFAULT_MODEL, progress=False)
    print(f"trained in {stats['seconds']:.0f} s", file=sys.stderr)
    return dictionaries.save(path)


def dictionary_mib(d: DictionarySet) -> float:
    """Stored size of a set's atoms (fp16) in MiB."""
    return 2 * (d.keys.numel() + d.values.numel()) / 2**20


__all__ = [
    "NeuralDict",
    "collect_kv",
    "dictionary_mib",
    "fit",
    "kmeans_init",
    "layer_groups",
    "train_default_dictionary",
    "train_dictionaries",
]
