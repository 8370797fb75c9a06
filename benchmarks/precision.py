"""What a precision changes: mIoU and labels of `bf16-mixed` / `bf16-true` against `32-true` on one dataset.

Each method (a config name plus `key=value` overrides, e.g. tiny random models) segments every image of the
suite's first dataset (default: the generated demo suite) in each precision, as `ovseg bench` does (weights
cast by `place`, autocast around `segment`); printed per method and precision: mIoU, its difference to
`32-true`, the share of pixels whose label equals the `32-true` label, and seconds per image. Not a test.

    python benchmarks/precision.py                                   # the tiny methods below, demo suite
    python benchmarks/precision.py --methods "sclip predictor.model=ovseg-tiny-vit predictor.pretrained=random"
"""

from __future__ import annotations

import argparse
import shlex
import time

TINY_CLIP = "predictor.model=ovseg-tiny-vit predictor.pretrained=random predictor.templates=single"
TINY_DINO = ("predictor.vfm.model=vit_base_patch8_224 predictor.vfm.pretrained=random "
             "'predictor.vfm.model_kwargs={embed_dim: 64, depth: 2, num_heads: 2}'")
DEFAULT_METHODS = [
    "tiny",  # maskclip + DINO + LPOSS+ (tiny random models)
    f"sclip {TINY_CLIP}",  # logit_scale path: softmax over names
    f"naclip {TINY_CLIP}",  # PAMR at the original size
    f"proxyclip {TINY_CLIP} {TINY_DINO}",  # VFM-guided last block
    f"cass {TINY_CLIP} {TINY_DINO}",  # VFM-guided, fp16 graph, whole-image term
    "scclip predictor.model=ovseg-tiny-vit-12 predictor.pretrained=random predictor.templates=single",  # 12-layer indices
    "resclip predictor.model=ovseg-tiny-vit-12 predictor.pretrained=random predictor.templates=single",
]
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")


def run(method: str, overrides: list[str], precision: str, dataset, spec):
    from ovseg.api import from_config
    from ovseg.evaluation.methods import dataset_protocol, dataset_vocabulary, resolve_method
    from ovseg.metrics import IoU
    from ovseg.pipeline.segmenter import resize_for

    cfg, _ = resolve_method(method, overrides)
    protocol = dataset_protocol(cfg, spec.name, spec.protocol)
    vocab = dataset_vocabulary(cfg, spec)
    seg = from_config(cfg, protocol, "cpu", precision)
    seg.set_classes(vocab)
    iou = IoU(vocab.num_classes, ignore_index=spec.ignore_index)
    labels, seconds = [], 0.0
    for i in range(len(dataset)):
        sample = dataset[i]
        start = time.perf_counter()
        result = seg.segment(resize_for(sample["image"], protocol))
        seconds += time.perf_counter() - start
        iou.update(result.labels, sample["label"])
        labels.append(result.labels)
    return float(iou.compute()["mean"]), labels, seconds / len(dataset)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="demo")
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help='"name key=value ..." per method')
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS), help="the first is the reference")
    args = ap.parse_args(argv)
    from ovseg.evaluation.suites import load_suite

    spec = load_suite(args.suite).datasets[0]
    dataset = spec.build(None)
    print(f"# {args.suite}/{spec.name}: {len(dataset)} images, CPU\n")
    first = args.precisions[0]
    print(f"| method | precision | mIoU | Δ mIoU vs {first} | labels equal to {first} | s/image |")
    print("|---|---|---|---|---|---|")
    for entry in args.methods:
        name, *overrides = shlex.split(entry)
        ref = None
        for precision in args.precisions:
            miou, labels, per_image = run(name, overrides, precision, dataset, spec)
            if ref is None:
                ref = (miou, labels)
            same = sum(int((a == b).sum()) for a, b in zip(labels, ref[1])) / sum(a.numel() for a in labels)
            print(f"| {entry} | {precision} | {100 * miou:.2f} | {100 * (miou - ref[0]):+.2f} | {100 * same:.2f} % | "
                  f"{per_image:.2f} |", flush=True)


if __name__ == "__main__":
    main()
