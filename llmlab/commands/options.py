"""The command-line options shared by several commands, declared once. Every option shows its
default and its choices in --help; choices are enums, so a bad value fails before any command runs.
One environment variable per setting: LLMLAB_MODEL (--model), LLMLAB_PROMPTS (--prompts-dir, read by
the template search itself), LLMLAB_CACHE, LLMLAB_DEBUG,
LLMLAB_HOME (where the run log lives) and LLMLAB_LOG=0 (--no-log)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from llmlab.core.config import (Backend, ChatMode, Dtype, GenEngine, InputFormat, Method, Normalize, OutputFormat,
                           Overflow, Selection, ShotFormat)

MODEL_PANEL = "Model"
GEN_PANEL = "Generation settings"
IO_PANEL = "Input and output"
PROMPT_PANEL = "Prompt building"
CLASSIFY_PANEL = "Classification"

Model = Annotated[
    Optional[str],
    typer.Option(
        "--model", "-m", envvar="LLMLAB_MODEL", rich_help_panel=MODEL_PANEL, show_default="smollm2",
        help="Hub id (google/flan-t5-base, gpt2...), a save_pretrained folder, a .gguf file, or an alias: "
        "smollm2 (embedded, offline), flan-t5-small|base|large. `llmlab models` lists them.",
    ),
]
AdapterOpt = Annotated[
    Optional[str], typer.Option("--adapter", rich_help_panel=MODEL_PANEL, show_default="none",
                                help="An adapter folder from `llmlab tune` to put on the model (same as -m BASE+DIR; "
                                "compare: adds BASE+DIR beside the -m models); a base other than the one it was "
                                "trained on is refused.")
]
Device = Annotated[
    str, typer.Option(help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.", rich_help_panel=MODEL_PANEL)
]
DtypeOpt = Annotated[
    Dtype, typer.Option("--dtype", help="auto: float32 on CPU/MPS, and on CUDA for models up to 1B parameters; "
                        "bfloat16 (float16 on cards without it) for bigger ones on CUDA.", rich_help_panel=MODEL_PANEL)
]
DeviceMapOpt = Annotated[
    Optional[str], typer.Option("--device-map", show_default="none: all on --device", rich_help_panel=MODEL_PANEL,
                                help="Spread the model over the visible GPUs, then CPU, then disk, with accelerate: "
                                "auto|balanced|balanced_low_0|sequential (see docs/scaling.md).")
]
MaxMemoryOpt = Annotated[
    Optional[str], typer.Option("--max-memory", show_default="what is free", rich_help_panel=MODEL_PANEL,
                                help="With --device-map: most weight memory per device, e.g. 0=20GiB,1=20GiB,cpu=64GiB; "
                                "what fits nowhere goes to disk.")
]
DryRun = Annotated[
    bool, typer.Option("--dry-run", rich_help_panel=MODEL_PANEL,
                       help="Print how the model would be placed on each device (and how much memory each gets), "
                       "then exit without loading weights.")
]
BackendOpt = Annotated[
    Backend, typer.Option("--backend", rich_help_panel=MODEL_PANEL,
                          help="hf: transformers (any device, --device-map); vllm: vLLM on CUDA GPUs "
                          "(pip install vllm; CUDA only).")
]
TensorParallel = Annotated[
    int, typer.Option("--tensor-parallel-size", rich_help_panel=MODEL_PANEL,
                      help="--backend vllm: GPUs each layer is split over (tensor parallelism).")
]
Server = Annotated[
    Optional[str], typer.Option("--server", envvar="LLMLAB_SERVER", rich_help_panel=MODEL_PANEL,
                                show_default="none: load the model here",
                                help="URL of a running `llmlab serve` (e.g. http://127.0.0.1:8000): it does the "
                                "work with its warm model; outputs, files and the run log are the same. Sends "
                                "LLMLAB_API_KEY as its key when set.")
]
Chat = Annotated[
    Optional[ChatMode], typer.Option(help="Wrap prompts in the model's chat template: auto (when it has one), on, "
                                     "off.", show_default="the template's, else auto", rich_help_panel=MODEL_PANEL)
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars, logs or warnings on stderr.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Logs on stderr even when it is not a terminal.")]
NoLog = Annotated[bool, typer.Option("--no-log", rich_help_panel=IO_PANEL,
                                     help="Don't record this run in the run log (`llmlab runs`); also LLMLAB_LOG=0.")]

MaxNewTokens = Annotated[
    Optional[int], typer.Option(show_default="the template's, else 64", rich_help_panel=GEN_PANEL,
                                help="Most tokens to add after the prompt.")
]
Greedy = Annotated[
    Optional[bool],
    typer.Option("--greedy/--sample", show_default="greedy", rich_help_panel=GEN_PANEL,
                 help="Greedy: always take the most likely next token, deterministic. "
                 "Sample: draw the next token at random from the distribution shaped by temperature, "
                 "top-k and top-p (setting any of those implies --sample)."),
]
Temperature = Annotated[
    Optional[float], typer.Option(show_default="1.0", rich_help_panel=GEN_PANEL,
                                  help="Sampling temperature: 1.0 leaves the distribution unchanged, < 1 sharpens "
                                  "it (safer, more repetitive), > 1 flattens it (more creative, more errors); "
                                  "0 = greedy.")
]
TopK = Annotated[
    Optional[int], typer.Option(show_default="0 = no limit", rich_help_panel=GEN_PANEL,
                                help="Sample only among the k most likely tokens.")
]
TopP = Annotated[
    Optional[float], typer.Option(show_default="1.0 = no limit", rich_help_panel=GEN_PANEL,
                                  help="Nucleus sampling, in (0, 1]: only the most likely tokens whose "
                                  "probabilities add up to p.")
]
RepetitionPenalty = Annotated[
    Optional[float], typer.Option(show_default="1.0 = none", rich_help_panel=GEN_PANEL,
                                  help="> 1 discourages repeating tokens already present.")
]
NumBeams = Annotated[
    Optional[int], typer.Option(show_default="1", rich_help_panel=GEN_PANEL,
                                help="Beam search width: keep this many candidate sequences.")
]
NumReturn = Annotated[
    Optional[int], typer.Option("--num-return-sequences", "-n", show_default="1", rich_help_panel=GEN_PANEL,
                                help="Completions per prompt (needs --sample or --num-beams >= n).")
]
Seed = Annotated[
    Optional[int], typer.Option(show_default="none: a fresh draw; 0 for shot draws",
                                rich_help_panel=GEN_PANEL,
                                help="Random seed for sampling and random/balanced shot draws: the same seed gives "
                                "the same result run to run.")
]
Stop = Annotated[
    Optional[list[str]], typer.Option(show_default="the template's, else none", rich_help_panel=GEN_PANEL,
                                      help="Stop text (repeatable): the completion is cut before it.")
]
Logprobs = Annotated[
    Optional[bool], typer.Option("--logprobs", show_default="off", rich_help_panel=GEN_PANEL,
                                 help="Report each completion token's log-probability under the model (JSONL "
                                 "\"logprobs\"; coloured by probability on a terminal).")
]
TopLogprobs = Annotated[
    Optional[int], typer.Option(show_default="0", rich_help_panel=GEN_PANEL,
                                help="With each token, the N most likely tokens at that step (0-20; implies "
                                "--logprobs).")
]
ConfigFile = Annotated[
    Optional[Path], typer.Option("--config", show_default="none", rich_help_panel=GEN_PANEL,
                                 help="YAML preset of generation settings (same names as the flags); flags "
                                 "override it.")
]

InputFile = Annotated[
    Optional[str], typer.Option("--input", "-i", show_default="none", rich_help_panel=IO_PANEL,
                                help="Batch input: JSONL, CSV (with header) or text (one prompt per line); - = stdin.")
]
InputFormatOpt = Annotated[
    InputFormat, typer.Option("--input-format", rich_help_panel=IO_PANEL, help="auto: from the extension or content.")
]
Offset = Annotated[int, typer.Option(rich_help_panel=IO_PANEL, help="Skip the first N input rows.")]
Limit = Annotated[
    Optional[int], typer.Option(show_default="all", rich_help_panel=IO_PANEL,
                                help="Use at most N input rows (after --offset).")
]
OutputFile = Annotated[
    Optional[str], typer.Option("--output", "-o", show_default="stdout", rich_help_panel=IO_PANEL,
                                help="Write results here (.jsonl, .csv or .txt).")
]
OutputFormatOpt = Annotated[
    OutputFormat, typer.Option("--format", "-f", rich_help_panel=IO_PANEL,
                               help="auto: from --output's extension; JSONL otherwise.")
]
BatchSize = Annotated[
    str, typer.Option(rich_help_panel=IO_PANEL, help="Inputs per forward pass (>= 1), or auto (start large, "
                      "halve on out-of-memory).")
]
GenEngineOpt = Annotated[
    GenEngine, typer.Option("--gen-engine", rich_help_panel=GEN_PANEL,
                            help="padded: generate() on padded batches; continuous: transformers' continuous "
                            "batching (greedy only); auto: whichever was measured faster on this device.")
]
Resume = Annotated[
    bool, typer.Option(rich_help_panel=IO_PANEL,
                       help="Skip inputs already in --output (matched by id, else by position) and append.")
]

TemplateOpt = Annotated[
    Optional[str], typer.Option("--template", "-t", show_default="none: plain prompts", rich_help_panel=PROMPT_PANEL,
                                help="A prompt template: a name from `llmlab prompt list` or a .yaml path.")
]
Shots = Annotated[
    Optional[int], typer.Option(rich_help_panel=PROMPT_PANEL, show_default="the template's shots:, else 0",
                                help="Demonstrations in the prompt: 0 = zero-shot, 1 = one-shot, N = few-shot.")
]
ShotSelection = Annotated[
    Optional[Selection], typer.Option(show_default="balanced for classify templates, else first",
                                      rich_help_panel=PROMPT_PANEL,
                                      help="Which examples: first (pool order), random (seeded), balanced "
                                      "(round-robin over labels, so classes are mixed).")
]
ShotSeed = Annotated[
    Optional[int], typer.Option("--seed", show_default="0", rich_help_panel=PROMPT_PANEL,
                                help="Seed for random/balanced shot draws.")
]
ShotFormatOpt = Annotated[
    Optional[ShotFormat], typer.Option("--shot-format", show_default="the template's, else turns",
                                       rich_help_panel=PROMPT_PANEL,
                                       help="With a chat template: demonstrations as user/assistant turns, or "
                                       "inline in one user turn.")
]
OverflowOpt = Annotated[
    Overflow, typer.Option("--overflow", rich_help_panel=PROMPT_PANEL,
                           help="A prompt too long for the context window: drop-shots (remove demonstrations, "
                           "warn; a prompt without shots is refused), truncate (cut the input from the left, "
                           "warn), or error (exit 5).")
]
Examples = Annotated[
    Optional[str], typer.Option(show_default="the template's", rich_help_panel=PROMPT_PANEL,
                                help="Demonstration pool (JSONL/CSV) instead of the template's examples.")
]
PromptsDir = Annotated[
    Optional[list[str]], typer.Option(show_default="none", rich_help_panel=PROMPT_PANEL,
                                      help="More folders of templates (repeatable). Also LLMLAB_PROMPTS "
                                      "(folders separated by ':').")
]
Vars = Annotated[
    Optional[list[str]], typer.Option("--var", show_default="none", rich_help_panel=PROMPT_PANEL,
                                      help="A template field for a single input: field=value (repeatable).")
]

MethodOpt = Annotated[
    Method, typer.Option("--method", rich_help_panel=CLASSIFY_PANEL,
                         help="score: each label's log-likelihood as the continuation (multiple choice); "
                         "generate: generate text and take the first label it mentions.")
]
NormalizeOpt = Annotated[
    Normalize, typer.Option("--normalize", rich_help_panel=CLASSIFY_PANEL,
                            help="Label scores: none (sum of token log-probs) or length (mean per token).")
]
Ensemble = Annotated[
    int, typer.Option(min=1, rich_help_panel=CLASSIFY_PANEL,
                      help="Average the label probabilities over N draws (or orders) of the demonstrations.")
]
ProbeData = Annotated[
    Optional[str], typer.Option(rich_help_panel=CLASSIFY_PANEL, show_default="the template's probe: file",
                                help="Labelled rows (JSONL/CSV, the template's fields) to fit --calibration "
                                "probe on: a logistic regression on the model's hidden states at the answer.")
]
ProbeSize = Annotated[
    int, typer.Option(rich_help_panel=CLASSIFY_PANEL,
                      help="Rows of --probe-data to fit on: a fixed seeded sample (all when fewer).")
]
ProbeLayers = Annotated[
    Optional[str], typer.Option(rich_help_panel=CLASSIFY_PANEL, show_default="60%, 80% and 100% of the depth",
                                help="Layers whose states the probe reads, e.g. 18,24,30 (0 = embeddings, -1 = last).")
]
