"""llmlab: a command-line prompt-engineering lab over Hugging Face transformers."""

import logging

__version__ = "0.1.0"

# Library code never prints: what it has to say (a rebuilt cache, a number used as text, an
# out-of-memory retry) goes to the logger "llmlab"; the CLI shows it on stderr (console.configure).
logging.getLogger("llmlab").addHandler(logging.NullHandler())

# A level between INFO and WARNING for long first-time work (a probe fit, an index build): the CLI
# shows it on stderr even when piped, one line each, and hides it only with --quiet.
NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")
