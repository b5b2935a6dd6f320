"""Sparse coding solvers: each vector as a few atoms of a dictionary (Matching Pursuit, Orthogonal MP).

Both run batched over every vector at once; only the `sparsity` iterations are a Python loop. A solver is any
callable `(x [n, dim], atoms [dim, A], s) -> (index [n, s], coef [n, s])`; `SOLVERS` names the built-in ones.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gearkit.compressors.checks import check_int

Solver = Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]]


def _pick(atoms_t: Tensor, index: Tensor) -> Tensor:
    """Rows of `atoms_t` `[..., atoms, dim]` (one matrix, or one per leading group) at `index` `[..., *rest]`;
    returns `[..., *rest, dim]`."""
    if atoms_t.dim() == 2:
        return atoms_t[index]
    groups = atoms_t.shape[:-2]
    flat = index.reshape(*groups, -1)
    picked = atoms_t.gather(-2, flat[..., None].expand(*flat.shape, atoms_t.shape[-1]))
    return picked.reshape(*index.shape, atoms_t.shape[-1])


def _check_solver_args(x: Tensor, atoms: Tensor, sparsity: int) -> None:
    if x.shape[-1] != atoms.shape[-2]:
        raise ValueError(f"vectors of dim {x.shape[-1]} cannot be coded over atoms of dim {atoms.shape[-2]}")
    check_int(sparsity, "sparsity")


def matching_pursuit(x: Tensor, atoms: Tensor, sparsity: int) -> tuple[Tensor, Tensor]:
    """Matching Pursuit: `sparsity` times, take the atom most correlated with the residual and subtract its
    projection. Differentiable in `x` and `atoms` through the coefficients (the choices are not).

    Args:
        x: `[..., n, dim]` vectors.
        atoms: `[dim, atoms]`, or `[..., dim, atoms]` with the leading dims of `x`; unit-norm columns.
        sparsity: atoms per vector `s`.

    Returns:
        `(index, coef)`: int64 `[..., n, s]` atom indices and `[..., n, s]` coefficients, so that
        `x ≈ sum_j coef[..., j] * atoms[:, index[..., j]]`.
    """
    _check_solver_args(x, atoms, sparsity)
    atoms_t, residual, indices, coefs = atoms.mT, x, [], []
    for _ in range(sparsity):
        corr = residual @ atoms
        index = corr.abs().argmax(-1)
        coef = corr.gather(-1, index[..., None]).squeeze(-1)
        residual = residual - coef[..., None] * _pick(atoms_t, index)
        indices.append(index)
        coefs.append(coef)
    return torch.stack(indices, -1), torch.stack(coefs, -1)


def orthogonal_matching_pursuit(x: Tensor, atoms: Tensor, sparsity: int, ridge: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Orthogonal Matching Pursuit: like MP, but after each choice the coefficients of all chosen atoms are
    refit by least squares (normal equations with a tiny ridge), and an atom is never chosen twice.

    Args:
        x: `[..., n, dim]` vectors.
        atoms: `[dim, atoms]`, or `[..., dim, atoms]` with the leading dims of `x`; unit-norm columns.
        sparsity: atoms per vector `s` (at most the number of atoms).
        ridge: added to the Gram matrix's diagonal, relative to 1 (the atoms' squared norm).

    Returns:
        `(index, coef)` as `matching_pursuit`.
    """
    _check_solver_args(x, atoms, sparsity)
    if sparsity > atoms.shape[-1]:
        raise ValueError(f"OMP picks distinct atoms: sparsity {sparsity} exceeds the {atoms.shape[-1]} atoms")
    atoms_t, residual = atoms.mT, x
    index = x.new_zeros(*x.shape[:-1], 0, dtype=torch.long)
    coef = x.new_zeros(*x.shape[:-1], 0)
    for k in range(1, sparsity + 1):
        score = (residual @ atoms).abs().scatter(-1, index, -1.0)  # chosen atoms are never chosen again
        index = torch.cat([index, score.argmax(-1, keepdim=True)], -1)
        chosen = _pick(atoms_t, index)  # [..., n, k, dim]
        gram = chosen @ chosen.mT + ridge * torch.eye(k, dtype=x.dtype, device=x.device)
        coef = torch.linalg.solve(gram, (chosen @ x[..., None])).squeeze(-1)
        residual = x - (coef[..., None, :] @ chosen).squeeze(-2)
    return index, coef


SOLVERS: dict[str, Solver] = {"mp": matching_pursuit, "omp": orthogonal_matching_pursuit}


def combine_atoms(index: Tensor, coef: Tensor, atoms: Tensor) -> Tensor:
    """`sum_j coef[..., j] * atoms[:, index[..., j]]`: `[..., n, dim]` from `[..., n, s]` codes and `atoms`
    `[dim, atoms]` (or `[..., dim, atoms]`)."""
    if atoms.dim() == 2:  # one fused gather + weighted sum
        flat = torch.nn.functional.embedding_bag(
            index.reshape(-1, index.shape[-1]).long(),
            atoms.mT.contiguous(),
            per_sample_weights=coef.reshape(-1, coef.shape[-1]).to(atoms.dtype),
            mode="sum",
        )
        return flat.reshape(*index.shape[:-1], atoms.shape[0])
    return (coef[..., None, :].to(atoms.dtype) @ _pick(atoms.mT, index.long())).squeeze(-2)
