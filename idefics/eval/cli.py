"""`idefics eval`: the few-shot evaluation protocol from the command line (the project's cli.py calls
`register`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..model_options import add_model_options, load_from_args

EVAL_DESCRIPTION = """\
Evaluate a checkpoint with in-context few-shot learning, as the Flamingo / IDEFICS papers do, and write
the scores as JSON, a markdown table and a PNG plot of score vs number of shots.

Per query the prompt shows N demonstrations (image, question/prompt, answer) from a support set, then the
query image and its question. Demonstrations are random (seeded) or chosen by RICES (the support images
most similar to the query by the model's own image features, most similar last). "0 shots" shows two
demonstrations as text only. Open-ended tasks generate with 3 beams (or greedily) and are scored after the
reference harness's post-processing; classification tasks rank the class names by mean log-probability.

Tasks and metrics:
  vqav2 okvqa textvqa vizwiz            VQA accuracy (%), --vqa-variant picks the official variant
  coco flickr30k nocaps textcaps        CIDEr-D x100 (pycocoevalcap; needs Java)
  hateful_memes                         ROC AUC;   imagenet rendered_sst2: top-1 accuracy
  mini-vqa mini-vqa-{colour,shape,count,position,reading} mini-digits
                                        offline tasks on the synthetic idefics-mini data (no downloads)

--data: for the mini-* tasks, a folder made by `idefics data make-mini DIR`; for the others, a JSON file
naming the files you downloaded (paths relative to the JSON file), e.g. for VQAv2:
  {"eval":    {"images": "val2014", "questions": "v2_OpenEnded_mscoco_val2014_questions.json",
               "annotations": "v2_mscoco_val2014_annotations.json"},
   "support": {"images": "train2014", "questions": "v2_OpenEnded_mscoco_train2014_questions.json",
               "annotations": "v2_mscoco_train2014_annotations.json"}}
  COCO (Karpathy split): {"eval": {"images": "coco", "annotations": "dataset_coco.json"},
                          "support": {"split": "train"}}
  HatefulMemes: {"eval": {"images": "hm", "annotations": "hm/dev_seen.jsonl"},
                 "support": {"annotations": "hm/train.jsonl"}}
  ImageNet: {"eval": {"images": "val", "class_list": "classes.txt"}, "support": {"images": "train"}}
Several tasks in one file: {"vqav2": {"eval": ..., "support": ...}, "coco": {...}}.
"""

EVAL_EPILOG = """\
examples:
  idefics data make-mini data/mini --n-train 0 --n-val 200 --n-test 200
  idefics eval --model ckpt/idefics-mini --task mini-vqa,mini-digits --data data/mini --shots 0,4 --limit 100
  idefics eval --model idefics-9b --task vqav2 --data vqav2.json --shots 0,4,8,16,32 --seed 42,43,44
  idefics eval --model idefics-9b --task imagenet --data imagenet.json --shots 16 --selection rices \\
      --support-size 5000 --out results/imagenet
  torchrun --nproc-per-node 4 --no-python idefics eval --model idefics-9b --task coco --data coco.json
      (each process evaluates every 4th batch of queries; the results equal a 1-process run's)

bad input (a missing image, a malformed annotation line, a question without answers) is reported with the
file and the line or item; --on-error skip drops it and goes on (the JSON lists what was skipped),
--on-error raise (default) stops at the first problem.

outputs in --out: results.json (every run + mean/std over seeds), results.md, results.png, and
predictions/<task>-<shots>shot-seed<seed>.jsonl (prompt, demonstrations, raw output, prediction, reference).
"""


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `eval` verb to the project's command line."""
    p = subparsers.add_parser("eval", help="few-shot evaluation on benchmarks (VQA, captioning, classification)",
                              description=EVAL_DESCRIPTION, epilog=EVAL_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, metavar="NAME[,NAME]", help="task name(s), comma-separated")
    p.add_argument("--data", required=True, metavar="PATH", help="data folder (mini-*) or data JSON file")
    p.add_argument("--shots", type=_int_list, default=[0, 4, 8], metavar="0,4,8",
                   help="numbers of demonstrations (default 0,4,8)")
    p.add_argument("--selection", choices=["random", "rices"], default="random",
                   help="how demonstrations are chosen (default random)")
    p.add_argument("--seed", type=_int_list, default=[42], metavar="42[,43]",
                   help="seed(s): one run per seed, reported as mean and std (default 42)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="evaluate N samples drawn with the seed instead of the whole split")
    p.add_argument("--support-size", type=int, default=2048, metavar="N",
                   help="support-set size drawn from the training split (default 2048, as the reference)")
    p.add_argument("--out", default="eval-results", metavar="DIR", help="output folder (default eval-results)")
    p.add_argument("--on-error", choices=["skip", "raise"], default="raise",
                   help="on bad input: skip it and go on, or stop (default raise)")
    p.add_argument("--decoding", choices=["beam", "greedy"], default="beam",
                   help="open-ended tasks: 3-beam search as the reference harness, or greedy (default beam)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="queries per batch (default 8)")
    p.add_argument("--vqa-variant", choices=["openflamingo", "official2016", "official2021"],
                   default="openflamingo", help="VQA accuracy variant (default openflamingo)")
    add_model_options(p)  # under torchrun, --device cuda means cuda:LOCAL_RANK
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_command)
    return p


def run_command(args: argparse.Namespace) -> int:
    from idefics.eval import distributed
    from idefics.eval.annotations import AnnotationError
    from idefics.eval.report import markdown_table
    from idefics.eval.runner import EvalConfig, EvalError, run_eval

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    initialised = distributed.init_from_env()
    completed, code = False, 0
    rank = distributed.rank()
    try:
        device = args.device
        if device == "cuda" and distributed.world_size() > 1:
            device = f"cuda:{os.environ.get('LOCAL_RANK', distributed.rank())}"
        config = EvalConfig(tasks=[t.strip() for t in args.task.split(",") if t.strip()], data=args.data,
                            shots=args.shots, seeds=args.seed, selection=args.selection, limit=args.limit,
                            support_size=args.support_size, batch_size=args.batch_size, decoding=args.decoding,
                            on_error=args.on_error, vqa_variant=args.vqa_variant, out_dir=args.out,
                            progress=not args.quiet)
        config.validate()
        pipe = load_from_args(args, device)
        results = run_eval(pipe, config)
        completed = True
    except (AnnotationError, EvalError, ValueError, FileNotFoundError) as error:
        print(f"idefics eval: error: {error}", file=sys.stderr)
        code = 2
    if completed and rank == 0:
        print(markdown_table(results), end="")
        print(f"results in {args.out}/results.json, results.md, results.png")
    return distributed.finish(initialised, completed, code)
