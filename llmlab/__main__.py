from llmlab.commands.cli import main

main()
