import json

from typer.testing import CliRunner

from llmlab.cli import app


def invoke(args, input=None, env=None):
    """Run the CLI in-process; stdout and stderr stay separate."""
    return CliRunner().invoke(app, [str(a) for a in args], input=input, env=env, catch_exceptions=False)


def jsonl(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]
