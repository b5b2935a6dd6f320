"""The `gearkit` command: demo, evaluation, generation, dictionary training and the recipe list.

Every command that runs a model takes `--model` and `--dtype` (`add_model`) and checks all its arguments before any
model loads: argparse types for single values, then the command's own checks (the model spec with `check_model`,
recipe names with `check_names`, texts against the model's tokenizer with `_tokenizer`), and only then `_load`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BUFFER_DTYPES = ("float16", "bfloat16", "float32", "model")
# the anchors (KIVI, GEAR as published), the calibration-free family, and the calibrated allocations where the model has
# them (`demo_recipes`)
DEMO_RECIPES = ["fp16", "kivi-4", "kivi-3", "sink-3", "kivi-2", "gear-2", "sinkrot-3.5", "sinkrot-3", "sinkrot-2.5"]


def demo_recipes(config=None, name: str = "") -> list[str]:
    """The demo's recipes: `DEMO_RECIPES`, then each `gk-*` calibrated for the model of `config` (None: the default
    model, which ships them)."""
    from gearkit import recipes
    from gearkit.models import model_identity

    identity = None if config is None else model_identity(config, name)
    return DEMO_RECIPES + [n for n in reversed(recipes.CALIBRATED) if not recipes.needs_calibration(n, identity)]


def progress_bar():
    """A tqdm wrapper on stderr, in the form `evaluate(progress=...)` takes."""
    from tqdm.auto import tqdm

    return lambda it, total=None, desc=None: tqdm(it, total=total, desc=desc, file=sys.stderr, leave=False)


def check_model(args):
    """Check `--model` before anything loads: a path that exists and holds a checkpoint or a GGUF file, or a model
    id in the local Hugging Face cache (`gearkit.models.resolve_model`).

    Returns:
        gearkit.models.ModelSource: where the model is, and its name.
    """
    from gearkit.models import resolve_model

    return resolve_model(args.model)


def _tokenizer(args):
    """The `--model`'s tokenizer alone, for the checks that need only the text (before the model loads)."""
    from gearkit.models import load_tokenizer

    return load_tokenizer(args.model)


def _load(args):
    """Load `--model` in `--dtype`, once every argument has been checked: `(model, tokenizer, name)`."""
    from gearkit.models import load_model

    print(f"loading {check_model(args).name} ...", file=sys.stderr)
    return load_model(args.model, args.dtype)


def buffer_dtype(args):
    """`--buffer-dtype` as `make_cache` takes it: a torch dtype, or None (`model`) for the model's own dtype."""
    import torch

    return None if args.buffer_dtype == "model" else getattr(torch, args.buffer_dtype)


def _ppl_rows(results) -> list[dict]:
    """Table rows; with a CSR cache among them, also bits/elt without the amortised dictionary."""
    shared = any(r.dictionary_bytes for r in results)
    rows = []
    for r in results:
        row = {
            "cache": r.recipe,
            "ppl": r.ppl,
            "ppl change": f"{r.ppl_increase_pct:+.2f}%",
            "bits/elt": r.bits_per_element,
        }
        if shared:
            row["bits/elt w/o dict"] = r.bits_per_element_without_dictionary
        rows.append(
            {
                **row,
                "ratio": r.compression_ratio,
                "KV MiB": r.kv_bytes / 2**20,
                "prefill tok/s": r.prefill_tokens_per_s,
                "cont. tok/s": r.continuation_tokens_per_s,
            }
        )
    return rows


def cmd_recipes(args) -> None:
    from gearkit import recipes
    from gearkit.integrations.hf import HF_BASELINES, available_baselines

    if args.json:  # whether a recipe serves any model, and whether the model in use needs a calibration step first
        for name in recipes.names():
            recipe = recipes.get(name)
            flags = {"model_bound": recipe.model_bound, "needs_calibration": recipes.needs_calibration(name)}
            try:
                print(json.dumps({**recipe.to_dict(), **flags}))
            except TypeError as e:  # a user recipe holding a dictionary set in memory, say
                print(json.dumps({"name": name, "error": str(e), **flags}))
        return

    for name in recipes.names():
        print(f"{name:12s} {recipes.describe(name)}")
    have = set(available_baselines())
    for name in HF_BASELINES:
        print(f"{name:12s} Hugging Face QuantizedCache baseline{'' if name in have else ' (backend not installed)'}")


def check_names(names, dictionary=None, model=None) -> list[str]:
    """Check cache names before anything loads. With `dictionary`, `csr-8` and `csr-4` read that file; without,
    they read the default dictionary, trained once for the default model if it is not there yet, and refused for
    another `model` (a `gearkit.models.ModelSource`; None: the default)."""
    from gearkit.csr import DEFAULT_RECIPES, default_dictionary_path, register_default_recipes
    from gearkit.integrations.hf import check_cache_name

    if dictionary is not None:
        if not Path(dictionary).is_file():
            raise FileNotFoundError(f"no dictionary file {str(dictionary)!r} (train one with: gearkit dict train)")
        register_default_recipes(dictionary, replace=True)
    names = [check_cache_name(n) for n in names]
    csr = sorted(set(names) & set(DEFAULT_RECIPES))
    if dictionary is None and csr and model is not None and model.kind != "default":
        raise ValueError(
            f"{csr[0]} reads the default dictionary, trained for the default model, not {model.name}; train one "
            f"with `gearkit dict train --model ... --out FILE` and pass --dictionary FILE"
        )
    if dictionary is None and csr and not default_dictionary_path().is_file():
        from gearkit.neuraldict import train_default_dictionary  # loads Lightning: only when there is training to do

        train_default_dictionary()
    return names


def cmd_eval_ppl(args) -> None:
    from gearkit.eval import format_table
    from gearkit.eval.perplexity import evaluate
    from gearkit.eval.threads import cpu_threads
    from gearkit.models import load_text, token_windows

    source = check_model(args)  # every argument is checked before any model loads
    names = check_names(args.recipe, args.dictionary, source)
    text = load_text(args.text)
    spans = token_windows(_tokenizer(args), text, args.prefix, args.continuation, args.windows)  # too short fails
    model_name = source.name
    if args.devices > 1:
        from gearkit.eval.runner import PerplexityTask, perplexity_results, predict

        # every DDP rank re-runs this command and loads the same --model and --dtype (in configure_model)
        task = PerplexityTask(
            names, prefix=args.prefix, model=args.model, dtype=args.dtype, buffer_dtype=buffer_dtype(args)
        )
        rows = predict(task, spans, devices=args.devices, threads=args.threads)
        if rows is None:  # a DDP rank other than 0: rank 0 prints
            return
        results = perplexity_results(rows, model_name, args.prefix)
    else:
        model, tokenizer, model_name = _load(args)
        with cpu_threads(args.threads):
            results = evaluate(
                model,
                tokenizer,
                names,
                text,
                args.prefix,
                args.continuation,
                args.windows,
                progress=progress_bar(),
                model_name=model_name,
                buffer_dtype=buffer_dtype(args),
            )
    if args.json:
        for r in results:
            print(json.dumps(r.summary()))
        return
    print(
        f"{model_name}, text {args.text}, {results[0].windows} window(s) of {args.prefix} + {args.continuation} "
        f"tokens, baseline ppl {results[0].baseline_ppl:.4f}"
    )
    print(format_table(_ppl_rows(results)))


def cmd_dict_train(args) -> None:
    import time

    from gearkit.models import load_text, token_windows
    from gearkit.neuraldict import dictionary_mib, train_default_dictionary, train_dictionaries

    source = check_model(args)
    if args.default:
        if source.kind != "default":
            raise ValueError("--default trains the default model's dictionary; for --model, pass --out FILE instead")
        print(json.dumps({"out": str(train_default_dictionary(force=True)), "model": source.name}))
        return
    if args.out is None:
        raise ValueError("dict train needs --out (or --default, to train the default dictionary of csr-8 / csr-4)")
    if Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a directory; name the .safetensors file to write")
    text = load_text(args.text)
    token_windows(_tokenizer(args), text, args.tokens, 1, args.windows)  # a text too short fails here
    model, tokenizer, model_name = _load(args)
    start = time.perf_counter()
    dictionaries, stats = train_dictionaries(
        model,
        tokenizer,
        text,
        model_name,
        args.atoms,
        args.sparsity,
        args.group_layers,
        args.vectors,
        args.epochs,
        args.tokens,
        args.windows,
        pre_rope=not args.post_rope,
        root=args.work_dir,
        progress=not args.quiet,
    )
    path = dictionaries.save(args.out)
    print(
        json.dumps(
            {
                "out": str(path),
                "model": model_name,
                "atoms": args.atoms,
                "sparsity": args.sparsity,
                "groups": len(dictionaries.groups),
                "key_space": dictionaries.metadata()["key_space"],
                "MiB": dictionary_mib(dictionaries),
                "seconds": time.perf_counter() - start,
                **{f"{role}_rel_mse": stats[role]["mse_trained"] for role in ("keys", "values")},
                **{f"{role}_rel_mse_kmeans": stats[role]["mse_init"] for role in ("keys", "values")},
            }
        )
    )


def cmd_eval_layers(args) -> None:
    from gearkit.eval import format_table
    from gearkit.eval.generation import layer_errors
    from gearkit.integrations.hf import HF_BASELINES
    from gearkit.models import first_tokens, load_text

    source = check_model(args)
    (name,) = check_names([args.recipe], model=source)
    if name in HF_BASELINES:
        raise ValueError(f"eval layers reads the keys and values a gearkit recipe stores; {name} is not a recipe")
    text = load_text(args.text)
    first_tokens(_tokenizer(args), text, args.tokens)  # a text too short fails before the model loads
    model, tokenizer, model_name = _load(args)
    rows = layer_errors(model, tokenizer, name, text, args.tokens, buffer_dtype(args))
    print(f"{model_name}, text {args.text}, {args.tokens} tokens prefilled into {name}")
    print(format_table(rows))


def cmd_eval_passkey(args) -> None:
    from gearkit.eval import format_table
    from gearkit.eval.passkey import passkey, passkey_prompts
    from gearkit.models import load_text

    source = check_model(args)
    names = check_names(args.recipe or [], args.dictionary, source)
    filler = load_text(args.text)
    lengths, depths = args.length or [1024, 2048], args.depth or [0.1, 0.5, 0.9]
    passkey_prompts(_tokenizer(args), filler, lengths, depths, args.keys)  # lengths the filler cannot fill fail here
    model, tokenizer, model_name = _load(args)
    results = passkey(
        model,
        tokenizer,
        names,
        filler,
        lengths,
        depths,
        args.keys,
        progress=progress_bar(),
        model_name=model_name,
        buffer_dtype=buffer_dtype(args),
    )
    if args.json:
        for r in results:
            print(json.dumps(r.summary()))
        return
    print(f"{model_name}, filler {args.text}, depths {depths}, {args.keys} key(s) per depth")
    print(format_table([r.summary() for r in results]))


def cmd_eval_retrieval(args) -> None:
    from gearkit.eval import format_table
    from gearkit.eval.retrieval import TASKS, Sizes, build_trials, retrieval, retrieval_results
    from gearkit.eval.threads import cpu_threads
    from gearkit.models import load_text

    source = check_model(args)  # every argument is checked before any model loads
    names = check_names(args.recipe or [], args.dictionary, source)
    sizes = Sizes(
        trials=args.trials,
        keys=args.keys,
        value_keys=args.value_keys,
        values=args.values,
        chains=args.chains,
        hops=args.hops,
    )
    tasks, lengths = args.task or list(TASKS), args.length or [1024, 2048]
    filler = load_text(args.text)
    trials = build_trials(_tokenizer(args), filler, tasks, lengths, sizes, args.depth, args.seed)  # bad sizes fail
    model_name = source.name
    if args.devices > 1:
        from gearkit.eval.runner import RetrievalTask, predict

        # every DDP rank re-runs this command and loads the same --model and --dtype (in configure_model)
        task = RetrievalTask(names, trials, model=args.model, dtype=args.dtype, buffer_dtype=buffer_dtype(args))
        rows = predict(task, [t.context for t in trials], devices=args.devices, threads=args.threads)
        if rows is None:  # a DDP rank other than 0: rank 0 prints
            return
        results = retrieval_results(rows, model_name)
    else:
        model, tokenizer, model_name = _load(args)
        with cpu_threads(args.threads):
            results = retrieval(
                model,
                tokenizer,
                names,
                trials,
                model_name,
                progress=progress_bar(),
                buffer_dtype=buffer_dtype(args),
            )
    if args.json:
        for r in results:
            print(json.dumps(r.summary()))
        return
    print(f"{model_name}, filler {args.text}, {sizes}")
    print(format_table([r.summary() for r in results]))


def cmd_eval_generation(args) -> None:
    from gearkit.eval.generation import agreement

    source = check_model(args)
    names = check_names(args.recipe, args.dictionary, source)
    model, tokenizer, model_name = _load(args)
    prompts = args.prompt or GENERATION_PROMPTS
    for index, prompt in enumerate(progress_bar()(prompts, total=len(prompts), desc="prompts")):
        for g in agreement(model, tokenizer, names, prompt, args.max_new_tokens, buffer_dtype(args)):
            row = {
                "prompt": index,
                "recipe": g.recipe,
                "model": model_name,
                "match_rate": round(g.match_rate, 4),
                "first_divergence": g.first_divergence,
                "compressed": g.compressed,
                "held": g.held,
                "tokens_per_s": round(g.tokens_per_s, 2),
            }
            if args.json:
                print(json.dumps(row))
                continue
            held = f"{g.compressed}/{g.held} tokens compressed"
            if not g.compressed:  # then the cache cannot differ from the uncompressed one: say so, not just "100%"
                held = f"nothing compressed (all {g.held} tokens in the full-precision buffer: use longer prompts)"
            print(
                f"prompt {index} [{g.recipe}] match {100 * g.match_rate:.1f}%, first divergence at new token "
                f"{g.first_divergence}, {held}, {g.tokens_per_s:.1f} tok/s"
            )


GENERATION_PROMPTS = [
    "Write a detailed essay about the history of the printing press and its effects on European society.",
    "Explain step by step how a hash table works, including collisions and resizing.",
    "Tell a long story about a lighthouse keeper who finds a message in a bottle.",
]


def cmd_generate(args) -> None:
    from gearkit.eval.generation import greedy
    from gearkit.eval.threads import cpu_threads
    from gearkit.integrations.hf import make_cache, memory_report

    source = check_model(args)
    (name,) = check_names([args.recipe], model=source)
    if args.devices > 1 or args.batch_size > 1:
        from gearkit.eval.runner import GenerationTask, predict

        # every DDP rank re-runs this command and loads the same --model and --dtype (in configure_model)
        task = GenerationTask(
            name,
            max_new_tokens=args.max_new_tokens,
            model=args.model,
            dtype=args.dtype,
            buffer_dtype=buffer_dtype(args),
        )
        rows = predict(task, args.prompt, devices=args.devices, batch_size=args.batch_size, threads=args.threads)
        for row in rows or []:  # None on DDP ranks other than 0
            print(json.dumps({**row, "model": source.name}) if args.json else row["text"])
        return
    model, tokenizer, model_name = _load(args)
    with cpu_threads(args.threads):
        for index, prompt in enumerate(args.prompt):
            cache = make_cache(name, model, buffer_dtype=buffer_dtype(args))
            tokens, seconds = greedy(model, tokenizer, prompt, args.max_new_tokens, cache)
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            print(
                json.dumps(
                    {
                        "index": index,
                        "recipe": name,
                        "model": model_name,
                        "prompt": prompt,
                        "token_ids": tokens.tolist(),
                        "text": text,
                    }
                )
                if args.json
                else text
            )
            report = memory_report(cache, model.config)
            print(
                f"[{name}: {len(tokens)} tokens in {seconds:.1f} s, cache {report.nbytes} bytes, "
                f"{report.bits_per_element:.2f} bits/element, {versus_fp16(report.compression_ratio)}]",
                file=sys.stderr,
            )


def cmd_calibrate(args) -> None:
    import time

    from gearkit.calibrate import ROLES, compressed_layers, measure, sensitivity, write
    from gearkit.models import load_text, token_windows

    if any(not 1 < b <= 16 for b in args.budget):
        raise ValueError(f"budgets are all-in bits per element in (1, 16], got {args.budget}")
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file; give a folder for the recipe files")
    text = load_text(args.text)
    token_windows(_tokenizer(args), text, args.prefix, args.continuation, args.windows)  # too short a text fails here
    model, tokenizer, model_name = _load(args)
    start = time.perf_counter()
    protocol = {
        "prefix": args.prefix,
        "continuation": args.continuation,
        "scored": args.scored,
        "windows": args.windows,
    }
    if args.devices > 1:
        from gearkit.calibrate.task import SensitivityTask
        from gearkit.eval.runner import predict

        layers = compressed_layers(model.config)
        task = SensitivityTask(text, **protocol, model=args.model, dtype=args.dtype)  # every rank loads the spec
        rows = predict(task, task.items(layers), devices=args.devices, threads=args.threads)
        if rows is None:  # a DDP rank other than 0: rank 0 writes
            return
        by_layer = {row["layer"]: row["kl"] for row in rows}
        kls = {r: {n: [by_layer[i][r][n] for i in layers] for n in by_layer[layers[0]][r]} for r in ROLES}
        result = sensitivity(model, model_name, layers, kls, {**protocol, "devices": args.devices})
    else:
        result = measure(model, tokenizer, model_name, text, progress=progress_bar(), **protocol)
    result.protocol.update(text=args.text, seconds=round(time.perf_counter() - start, 1))
    for path in write(result, args.budget, None if args.out is None else Path(args.out)):
        recipe = json.loads(path.read_text())
        print(
            json.dumps(
                {"recipe": recipe["name"], "model": model_name, "file": str(path), "description": recipe["description"]}
            )
        )


def cmd_demo(args) -> None:
    from gearkit.eval import format_table
    from gearkit.eval.generation import agreement
    from gearkit.eval.perplexity import evaluate
    from gearkit.integrations.hf import available_baselines
    from gearkit.models import DEFAULT_TEXT, first_tokens, load_text, token_windows

    text, tokenizer = load_text(DEFAULT_TEXT), _tokenizer(args)  # a bad --model fails here
    token_windows(tokenizer, text, args.prefix, args.continuation, args.windows)  # a text too short fails here
    first_tokens(tokenizer, text, args.context)
    model, tokenizer, model_name = _load(args)
    names = demo_recipes(model.config, model_name) + available_baselines()
    results = evaluate(
        model,
        tokenizer,
        names,
        text,
        args.prefix,
        args.continuation,
        args.windows,
        progress=progress_bar(),
        model_name=model_name,
        buffer_dtype=buffer_dtype(args),
    )
    print(
        f"\nPerplexity with a compressed past: {model_name}, {DEFAULT_TEXT} text, {results[0].windows} window(s) of "
        f"{args.prefix} prefilled + {args.continuation} scored tokens; uncompressed baseline ppl "
        f"{results[0].baseline_ppl:.4f}. Bits/elt and ratio are all-in, from the bytes held."
    )
    print(format_table(_ppl_rows(results)))
    # the passage puts most of every cache's tokens past its full-precision buffer (128 tokens at most)
    passage = tokenizer.decode(first_tokens(tokenizer, text, args.context)[0], skip_special_tokens=True)
    print(
        f"\nGreedy generation: {args.context} tokens of the {DEFAULT_TEXT} text, then {args.prompt!r}; match = new "
        f"tokens equal to the uncompressed cache's, compressed = tokens held compressed at the end (the rest "
        f"in the full-precision buffer)."
    )
    prompt = f"{passage}\n\n{args.prompt}"
    generations = agreement(model, tokenizer, names, prompt, args.max_new_tokens, buffer_dtype(args))
    print(
        format_table(
            [
                {
                    "cache": g.recipe,
                    "match": f"{100 * g.match_rate:.0f}%",
                    "compressed": f"{g.compressed}/{g.held} ({100 * g.compressed / max(g.held, 1):.0f}%)",
                    "first diff": "-" if g.first_divergence is None else g.first_divergence,
                    "tok/s": g.tokens_per_s,
                }
                for g in generations
            ]
        )
    )
    for g in generations:
        print(f"\n[{g.recipe}]\n{g.text.strip()}")


def versus_fp16(ratio: float) -> str:
    """A compression ratio in words: `4.00x smaller than fp16`, or `1.12x larger than fp16` for an expansion."""
    if ratio >= 1:
        return f"{ratio:.2f}x smaller than fp16"
    return f"{1 / ratio:.2f}x larger than fp16"


def positive_int(value: str) -> int:
    """argparse type: an int of at least 1."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def fraction(value: str) -> float:
    """argparse type: a number within [0, 1] (not NaN)."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number within [0, 1], got {value!r}") from None
    if not 0 <= x <= 1:  # False for NaN too
        raise argparse.ArgumentTypeError(f"must be within [0, 1], got {value!r}")
    return x


def add_model(parser: argparse.ArgumentParser, caches: bool = True) -> None:
    """The model options, the same for every command that runs a model: `--model` and `--dtype` (read by `_load`),
    and where the command builds caches, `--buffer-dtype` (read by `buffer_dtype`)."""
    from gearkit.models import DEFAULT_MODEL, DTYPES

    parser.add_argument(
        "--model",
        default=None,
        help="a Hugging Face checkpoint directory, a .gguf file, or a model id already in the local Hugging Face "
        f"cache (nothing is downloaded); default: the embedded {DEFAULT_MODEL}",
    )
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="the model's parameter dtype")
    if caches:
        parser.add_argument(
            "--buffer-dtype",
            choices=BUFFER_DTYPES,
            default="float16",
            help="storage dtype of the recipes' full-precision buffers and sink tokens; 'model' keeps the model's "
            "dtype (for a bfloat16 model whose keys exceed float16's range: bfloat16, float32 or model)",
        )


def add_text(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """The `--text` option, the same for every command that reads text (default: the default text)."""
    from gearkit.models import DEFAULT_TEXT, TEXTS

    parser.add_argument(
        "--text", default=default or DEFAULT_TEXT, help=f"a text file, or a built-in text: {', '.join(TEXTS)}"
    )


def add_devices(parser: argparse.ArgumentParser, split: str) -> None:
    """The `--devices` and `--threads` options of the commands that can run on several devices; `split` says what
    N processes share and that the results do not depend on N."""
    parser.add_argument(
        "--devices",
        type=positive_int,
        default=1,
        help=f"N > 1: {split} (Lightning DDP, gloo on CPU); 1: the plain loop",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads per process. Float results on CPU depend on it: pin it to compare --devices counts "
        "exactly (default: torch's choice on one device, cores // N per process on N)",
    )


def add_dictionary(parser: argparse.ArgumentParser) -> None:
    """The `--dictionary` option of the commands that take `csr-*` recipes."""
    parser.add_argument(
        "--dictionary", default=None, help="dictionary file for csr-8 / csr-4 (default: the cached default)"
    )


def build_parser() -> argparse.ArgumentParser:
    from gearkit.csr import DEFAULT_DICTIONARY

    parser = argparse.ArgumentParser(prog="gearkit", description="Composable KV-cache compression.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="compare recipes on a model (default: the embedded one) and the default text")
    add_model(demo)
    demo.add_argument("--prefix", type=positive_int, default=512)
    demo.add_argument("--continuation", type=positive_int, default=512)
    demo.add_argument("--windows", type=positive_int, default=1)
    demo.add_argument(
        "--context",
        type=positive_int,
        default=384,
        help="tokens of the default text before the prompt: every cache then holds most of its tokens compressed",
    )
    demo.add_argument("--prompt", default="Summarize the text above in three sentences.")
    demo.add_argument("--max-new-tokens", type=positive_int, default=64)
    demo.set_defaults(func=cmd_demo)

    listing = sub.add_parser("recipes", help="list the recipes")
    listing.add_argument("--json", action="store_true", help="print each recipe's definition as one JSON object")
    listing.set_defaults(func=cmd_recipes)

    gen = sub.add_parser("generate", help="generate with a compressed cache")
    add_model(gen)
    gen.add_argument("--recipe", required=True)
    gen.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    gen.add_argument("--max-new-tokens", type=positive_int, default=128)
    gen.add_argument(
        "--batch-size",
        type=positive_int,
        default=1,
        help="prompts per left-padded batch (Lightning path); a prompt's output can depend on its "
        "batch, never on --devices",
    )
    add_devices(gen, "prompts sharded over N processes/devices; greedy tokens are the same at the same --threads")
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    gen.set_defaults(func=cmd_generate)

    ev = sub.add_parser("eval", help="evaluate recipes on a model").add_subparsers(dest="what", required=True)
    ppl = ev.add_parser("ppl", help="perplexity with a compressed past")
    add_model(ppl)
    ppl.add_argument("--recipe", action="append", required=True, help="recipe or HF baseline; repeat for several")
    add_text(ppl)
    ppl.add_argument("--prefix", type=positive_int, default=1024)
    ppl.add_argument("--continuation", type=positive_int, default=1024)
    ppl.add_argument("--windows", type=positive_int, default=4, help="at most this many windows")
    ppl.add_argument("--json", action="store_true", help="print one JSON object per recipe")
    add_dictionary(ppl)
    add_devices(
        ppl, "windows sharded over N processes/devices; bytes are the same, perplexities too at the same --threads"
    )
    ppl.set_defaults(func=cmd_eval_ppl)
    pk = ev.add_parser("passkey", help="passkey retrieval: a number hidden in filler text, asked for at the end")
    add_model(pk)
    pk.add_argument(
        "--recipe",
        action="append",
        help="recipe or HF baseline; repeat for several (the uncompressed cache always runs too)",
    )
    add_text(pk)
    pk.add_argument(
        "--length", type=positive_int, action="extend", nargs="+", help="prompt lengths in tokens (default 1024 2048)"
    )
    pk.add_argument(
        "--depth", type=fraction, action="extend", nargs="+", help="needle depths in [0, 1] (default 0.1 0.5 0.9)"
    )
    pk.add_argument("--keys", type=positive_int, default=2, help="keys tried per depth")
    pk.add_argument("--json", action="store_true", help="print one JSON object per (cache, length)")
    add_dictionary(pk)
    pk.set_defaults(func=cmd_eval_passkey)
    rt = ev.add_parser(
        "retrieval", help="RULER-style retrieval: multi-key needles, multi-value needles, variable tracking"
    )
    add_model(rt)
    rt.add_argument(
        "--recipe",
        action="append",
        help="recipe or HF baseline; repeat for several (the uncompressed cache always runs too)",
    )
    add_text(rt)
    rt.add_argument(
        "--task",
        action="append",
        choices=["multi-key", "multi-value", "variable-tracking"],
        help="repeat for several (default: all three)",
    )
    rt.add_argument(
        "--length", type=positive_int, action="extend", nargs="+", help="haystack lengths in tokens (default 1024 2048)"
    )
    rt.add_argument(
        "--depth",
        type=fraction,
        action="extend",
        nargs="+",
        help="needle depths in [0, 1], used in a seeded order (default: uniform random depths)",
    )
    rt.add_argument(
        "--trials", type=positive_int, default=8, help="questions per task and length (haystacks as many as needed)"
    )
    rt.add_argument("--keys", type=positive_int, default=4, help="multi-key: needles per haystack, each asked for")
    rt.add_argument("--value-keys", type=positive_int, default=2, help="multi-value: keys per haystack, each asked for")
    rt.add_argument("--values", type=positive_int, default=2, help="multi-value: numbers per key")
    rt.add_argument("--chains", type=positive_int, default=1, help="variable tracking: chains per haystack")
    rt.add_argument("--hops", type=positive_int, default=1, help="variable tracking: assignments after the first")
    rt.add_argument("--seed", type=int, default=0)
    rt.add_argument("--json", action="store_true", help="print one JSON object per (cache, task, length)")
    add_dictionary(rt)
    add_devices(rt, "haystacks sharded over N processes/devices; answers are the same at the same --threads")
    rt.set_defaults(func=cmd_eval_retrieval)
    gen_eval = ev.add_parser("generation", help="long greedy continuations: agreement with the uncompressed cache")
    add_model(gen_eval)
    gen_eval.add_argument("--recipe", action="append", required=True, help="recipe or HF baseline; repeat for several")
    gen_eval.add_argument("--prompt", action="append", help="repeat for several (default: three built-in prompts)")
    gen_eval.add_argument("--max-new-tokens", type=positive_int, default=256)
    gen_eval.add_argument("--json", action="store_true", help="print one JSON object per (prompt, recipe)")
    add_dictionary(gen_eval)
    gen_eval.set_defaults(func=cmd_eval_generation)
    layers = ev.add_parser("layers", help="per-layer reconstruction error of keys and values")
    add_model(layers)
    layers.add_argument("--recipe", required=True)
    add_text(layers)
    layers.add_argument("--tokens", type=positive_int, default=1024)
    layers.set_defaults(func=cmd_eval_layers)

    cal = sub.add_parser("calibrate", help="per-layer bit allocations for a model, written as recipe files")
    add_model(cal, caches=False)
    add_text(cal, default="idle-help")
    cal.add_argument(
        "--budget",
        type=float,
        nargs="+",
        default=[2.5, 3.0, 3.5, 4.5],
        help="all-in bits per element; one recipe (gk-<budget>) each",
    )
    cal.add_argument(
        "--out",
        default=None,
        help="folder for the recipe files (always also kept in gearkit's cache "
        "dir, where gk-* names find them for this model)",
    )
    cal.add_argument("--prefix", type=positive_int, default=1024, help="prefilled tokens per tuning window")
    cal.add_argument(
        "--continuation", type=positive_int, default=1024, help="tokens after the prefix per tuning window"
    )
    cal.add_argument(
        "--scored",
        type=positive_int,
        default=256,
        help="tokens scored per window, in chunks spread over the continuation",
    )
    cal.add_argument("--windows", type=positive_int, default=2, help="tuning windows")
    add_devices(cal, "layers measured by N processes/devices; the same numbers at the same --threads")
    cal.set_defaults(func=cmd_calibrate)

    dct = sub.add_parser("dict", help="CSR dictionaries").add_subparsers(dest="what", required=True)
    train = dct.add_parser("train", help="train NeuralDict dictionaries on KV vectors of a text (Lightning)")
    add_model(train, caches=False)
    add_text(train)
    train.add_argument("--atoms", type=positive_int, default=DEFAULT_DICTIONARY["atoms"], help="atoms per dictionary")
    train.add_argument(
        "--sparsity",
        type=positive_int,
        default=DEFAULT_DICTIONARY["sparsity"],
        help="key atoms per vector (values: half per half)",
    )
    train.add_argument("--out", help="output .safetensors path")
    train.add_argument(
        "--default",
        action="store_true",
        help="train the default dictionary (read by csr-8 / csr-4) with the default settings",
    )
    train.add_argument(
        "--group-layers",
        type=positive_int,
        default=DEFAULT_DICTIONARY["group_layers"],
        help="adjacent layers sharing a dictionary",
    )
    train.add_argument("--vectors", type=positive_int, default=12288, help="training vectors per group and role")
    train.add_argument("--epochs", type=positive_int, default=4)
    train.add_argument("--tokens", type=positive_int, default=1024, help="tokens per calibration window")
    train.add_argument("--windows", type=positive_int, default=4, help="calibration windows")
    train.add_argument("--post-rope", action="store_true", help="train key dictionaries on post-RoPE keys")
    train.add_argument("--work-dir", default=None, help="Lightning checkpoints and logs (default: temporary)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(func=cmd_dict_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError) as e:
        print(f"gearkit: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
