"""Copy a ticket's model card and its plots into model_cards/<name>/, with a note on how the run was shortened.

    python scripts/example_card.py runs/cards/lenet300_mnist/ticket model_cards/lenet300_mnist \
        --note "3 of the recipe's 20 levels, 1,500 of its 50,000 steps per level, on 2 CPU cores"

Only the card (README.md) and its PNG files are copied: weights stay out of git. The note goes into the card's
`example_run` section; every other section is the one the run wrote.
"""

from __future__ import annotations

import argparse
import os
import shutil

from hf_tickets.cards import get_section, set_section
from hf_tickets.files import write_text_atomic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ticket", help="a ticket folder written by hf-tickets run")
    parser.add_argument("destination", help="model_cards/<name>")
    parser.add_argument("--note", required=True, help="how this run differs from the full recipe")
    opts = parser.parse_args()
    os.makedirs(opts.destination, exist_ok=True)
    for name in sorted(os.listdir(opts.ticket)):
        if name == "README.md" or name.endswith(".png"):
            shutil.copy2(os.path.join(opts.ticket, name), os.path.join(opts.destination, name))
    note = (
        "## About this example card\n\n"
        f"This card was written by a real but **shortened** run of the recipe: {opts.note}. The numbers are that "
        "run's, not the paper's; the exact command is in the Reproduce section below. Weights are not kept in this "
        "repository (run the command to get them)."
    )
    path = os.path.join(opts.destination, "README.md")
    text = open(path, encoding="utf-8").read()
    if get_section(text, "example_run") is None:  # right under the title, where a reader starts
        head, title, rest = text.partition("\n# ")
        line, _, body = rest.partition("\n")
        block = "<!-- hf_tickets:example_run:start -->\n" + note + "\n<!-- hf_tickets:example_run:end -->\n"
        text = f"{head}{title}{line}\n\n{block}{body}"
    else:
        text = set_section(text, "example_run", note)
    write_text_atomic(path, text)
    print(os.path.join(opts.destination, "README.md"))


if __name__ == "__main__":
    main()
