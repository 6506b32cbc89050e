"""Zero-shot evaluation: retrieval (short, long, multilingual captions) and classification, CLIP_benchmark metrics.

On the toy world (the newest checkpoint under runs/, the toy world's test split):
    python eval.py --task retrieval                    # toyworld/retrieval_short.jsonl
    python eval.py --task retrieval --dataset long     # toyworld/retrieval_long.jsonl (also de, fr, es, ...)
    python eval.py --task retrieval --dataset val_long # the validation split: toyworld/retrieval_val_long.jsonl
    python eval.py --task zeroshot                     # toyworld/zeroshot/test, its classnames and templates
    python eval.py --task zeroshot --dataset val       # toyworld/zeroshot/val
On your data, for the CLIP baseline (--clip) or a ProCLIP run / checkpoint (--model):
    python eval.py --task retrieval --clip CLIP_DIR --dataset karpathy.json --images flickr30k --output out.json
    python eval.py --task retrieval --model runs/<stage-2 run> --dataset xm3600.jsonl --language de --show 8
    python eval.py --task zeroshot --model runs/<stage-2 run> --dataset imagenet/val --classnames names.txt --output out.json
The CLIP baseline may be an open_clip folder (ViT or EVA02-CLIP); --model may be a released LLM2CLIP/ProCLIP model:
    python eval.py --task retrieval --clip EVA02-L-14-336_DIR --dataset karpathy.json --images flickr30k
    python eval.py --task retrieval --model LLM2CLIP-EVA02-L-14-336.pt --llm LLM2CLIP_LLAMA3_DIR --dataset my.jsonl
The paper's benchmarks in their released layouts under one folder (README, "Benchmarks"): Tables 1 and 2 and XM3600:
    python eval.py --benchmark proclip --data-root BENCH --model ProCLIP.pt --llm LLM_DIR  # benchmark.json, .md
    python eval.py --dataset urban1k --data-root BENCH --clip CLIP_DIR                     # one benchmark
Metric definitions are LAION-AI/CLIP_benchmark's (see miniproclip/metrics.py); the flags and flow are in
miniproclip/eval_cli.py, the readers and runners in miniproclip/evaluation.py.
"""

from miniproclip.eval_cli import main

if __name__ == "__main__":
    main()
