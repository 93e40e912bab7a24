"""Write the small data sets of the other examples (all derived from the quickstart tickets).

* ``prefs.jsonl`` - preference pairs for DPO: the routed JSON line is chosen, a
  chatty answer or a wrong route is rejected;
* ``order_numbers.jsonl`` - a second task for the sequential (EWC + replay) and
  multi-task examples: read the order number out of a ticket;
* ``styled_tickets.jsonl`` - routing rows with curly quotes and dashes (for the
  example plugin package's typography cleaner);
* ``handbook.txt`` - a raw-text corpus (the support handbook of a made-up shop)
  for continued pre-training.

    python examples/data/make_examples.py            # rewrites the files
    python examples/data/make_examples.py --check    # fails if any file is stale
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_quickstart as qs  # noqa: E402

CHATTY = [
    "Thank you for reaching out! It sounds like this is a {team} matter. I will pass it on.",
    "I'm sorry to hear that. Our {team} team should be able to help you with this.",
    "This looks like a question for {team}. Is there anything else I can help with?",
]


def prefs(n: int = 80) -> list[dict]:
    rng = random.Random(11)
    teams = list(qs.PROBLEMS)
    rows = []
    for i in range(n):
        team = teams[i % len(teams)]
        urgent = rng.random() < 0.4
        prio = "urgent" if urgent else "normal"
        ticket = qs.make_ticket(rng, team, urgent)
        if rng.random() < 0.5:
            rejected = rng.choice(CHATTY).format(team=team)
        else:
            wrong = rng.choice([t for t in teams if t != team])
            rejected = qs.answer(wrong, prio)
        rows.append({
            "prompt": f"{qs.INSTRUCTION}\n\n{ticket}",
            "chosen": qs.answer(team, prio),
            "rejected": rejected,
        })
    return rows


def order_numbers(n: int = 120) -> list[dict]:
    rng = random.Random(23)
    teams = list(qs.PROBLEMS)
    rows = []
    for i in range(n):
        team = teams[i % len(teams)]
        num = f"{rng.randint(100000, 999999)}"
        ticket = qs.make_ticket(rng, team, rng.random() < 0.3)
        sentences = ticket.split(". ")
        pos = rng.randint(0, len(sentences))
        sentences.insert(pos, f"Order #{num} is the one I mean")
        ticket = ". ".join(sentences)
        rows.append({
            "messages": [
                {"role": "user", "content": f"Which order number does this ticket mention?\n\n{ticket}"},
                {"role": "assistant", "content": f"Order {num}."},
            ],
            "metadata": {"task": "order-number"},
        })
    return rows


def styled_tickets(n: int = 24) -> list[dict]:
    """Routing rows typed on a phone: curly quotes, dashes and ellipses (the example
    plugin's typography cleaner folds them to ASCII)."""
    rng = random.Random(31)
    teams = list(qs.PROBLEMS)
    rows = []
    for i in range(n):
        team = teams[i % len(teams)]
        urgent = rng.random() < 0.4
        ticket = qs.make_ticket(rng, team, urgent).replace("'", "\u2019")
        ticket = rng.choice(["\u201cHelp\u201d \u2014 ", "Hi\u2026 ", "So \u2013 "]) + ticket
        rows.append(qs.row(ticket, team, "urgent" if urgent else "normal", typed_on="phone"))
    return rows


HANDBOOK_TOPICS = {
    "billing": ["refunds reach the original card within five working days",
                "a duplicate charge is reversed the same day it is reported",
                "VAT invoices can be downloaded from the account page",
                "price changes are announced thirty days in advance"],
    "shipping": ["parcels are handed to the courier within two working days",
                 "a missing parcel is investigated after seven days without tracking updates",
                 "addresses can be changed until the parcel leaves the warehouse",
                 "damaged deliveries are replaced without asking for the item back"],
    "account": ["password reset links expire after one hour",
                "a locked account opens again after thirty minutes",
                "two accounts can be merged by the account team on request",
                "deleting an account removes every stored record within thirty days"],
    "technical": ["crash reports are read by an engineer every morning",
                  "a firmware update can be retried from the settings page",
                  "sync problems are usually fixed by signing out and in again",
                  "known errors are listed on the status page with a workaround"],
}


def handbook() -> str:
    rng = random.Random(5)
    paras = ["The Acme support handbook describes how each team works. Every ticket is routed to exactly one "
             "team and given a priority, urgent or normal, before anyone replies."]
    for team, facts in HANDBOOK_TOPICS.items():
        for f in facts:
            opener = rng.choice(["As a rule,", "In practice,", "By policy,", "Customers should know that"])
            paras.append(
                f"{opener} {f}. The {team} team owns this promise and reports on it every week. "
                f"When a customer writes about it, the ticket goes to {team}, and it is urgent only when the "
                f"customer says it cannot wait."
            )
    paras.append("Urgent tickets are answered within one hour during opening times. Normal tickets are answered "
                 "within one working day. Every answer is signed with the agent's first name.")
    return "\n\n".join(paras) + "\n"


def files() -> dict[str, str]:
    def jsonl(rows: list[dict]) -> str:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    return {
        "prefs.jsonl": jsonl(prefs()),
        "order_numbers.jsonl": jsonl(order_numbers()),
        "handbook.txt": handbook(),
        "styled_tickets.jsonl": jsonl(styled_tickets()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a file differs from what this writes")
    args = ap.parse_args(argv)
    stale = []
    for name, text in files().items():
        path = HERE / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
            continue
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        print(f"wrote {path}")
    if stale:
        print("stale: " + ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
