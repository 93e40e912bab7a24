"""Write ``quickstart.jsonl``: support tickets routed to a strict JSON line.

The task is a house format the base model cannot know: read a customer's ticket
and answer with exactly ``{"team": T, "priority": P}`` where T is one of
billing / shipping / account / technical and P is urgent when the customer says
it cannot wait, normal otherwise. SmolLM2-135M-Instruct answers in prose (0%
exact match); a LoRA adapter trained for ~80 steps learns the format and the
routing.

The tickets are composed from independent parts (opening, problem, detail,
closing) with random slot values, so near-duplicate detection keeps nearly all of
them. A few planted rows show the cleaners at work: exact duplicates (rejected),
and contact details (scrubbed by the PII cleaner).

    python examples/data/make_quickstart.py            # rewrites quickstart.jsonl
    python examples/data/make_quickstart.py --check    # fails if the file is stale
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 7
N_ROWS = 320
HERE = Path(__file__).resolve().parent
OUT = HERE / "quickstart.jsonl"

INSTRUCTION = "Route this support ticket."

PRODUCTS = ["the Pro plan", "my Basic subscription", "the family plan", "the annual plan", "the team workspace",
            "the mobile app", "the desktop app", "my smart speaker", "the wireless headphones", "the coffee grinder",
            "the standing desk", "the e-reader", "the fitness tracker", "the camera bundle", "the router"]
AMOUNTS = ["$9.99", "$14.50", "$29", "$49.00", "$120", "$7.25", "$63.40", "$199", "$15", "$84.10"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
CITIES = ["Lisbon", "Denver", "Osaka", "Leeds", "Toronto", "Austin", "Lyon", "Perth", "Dublin", "Nairobi", "Oslo",
          "Porto"]
CARRIERS = ["the courier", "the post office", "the delivery van", "the carrier", "the driver"]
DEVICES = ["my laptop", "my phone", "my tablet", "the office PC", "my Chromebook", "my work computer"]
ERRORS = ["error 502", "a blank screen", "error code E-17", "a spinning wheel", "a timeout message",
          "'something went wrong'", "error 0x80070", "a white page"]

PROBLEMS = {
    "billing": [
        "I was charged twice for {product} this month.",
        "My invoice for {month} shows {amount} but I expected less.",
        "Please refund the {amount} you took after I cancelled {product}.",
        "The card payment for {product} failed but the money left my account.",
        "Why did the price of {product} go up to {amount}?",
        "I need a VAT invoice for the {amount} payment in {month}.",
        "You billed me {amount} for {product}, which I never ordered.",
        "My discount code was not applied and I paid {amount}.",
        "I want to change the credit card that {product} is billed to.",
        "There is an unknown charge of {amount} on my statement from {month}.",
    ],
    "shipping": [
        "My order of {product} has not arrived and it was due in {month}.",
        "The tracking page for my parcel to {city} has not moved for a week.",
        "{carrier} left the box with {product} at the wrong address in {city}.",
        "The package arrived crushed and {product} inside is scratched.",
        "Can you ship {product} to {city} instead of my home address?",
        "I only received half of my order; {product} is missing from the box.",
        "Delivery of {product} was marked as done but nothing came to {city}.",
        "How long does shipping to {city} usually take for {product}?",
        "{carrier} says the address in {city} is incomplete.",
        "My parcel with {product} was sent back to your warehouse.",
    ],
    "account": [
        "I cannot log in since I changed my email address.",
        "Please delete my account and all the data you keep about me.",
        "I forgot my password and the reset link never arrives.",
        "Someone changed the name on my profile without asking me.",
        "How do I add a second user to {product}?",
        "My account was locked after too many sign-in attempts.",
        "I want to merge my two accounts into one.",
        "The two-factor code is sent to an old phone number.",
        "I would like to change the username on my account.",
        "Please move {product} from my personal account to my company account.",
    ],
    "technical": [
        "The app crashes on {device} every time I open settings.",
        "When I press save I get {error} on {device}.",
        "Sync between {device} and the web version stopped working.",
        "{product} keeps disconnecting from the wifi.",
        "Since the last update {device} shows {error} on start.",
        "Exports from {product} come out as empty files.",
        "The page loads forever on {device} and then shows {error}.",
        "Notifications from {product} stopped on {device}.",
        "The firmware update for {product} fails half way.",
        "Search returns {error} for every query on {device}.",
    ],
}

OPENINGS = ["", "", "Hello,", "Hi there,", "Good morning,", "Dear support,", "Hey team,", "Hi,", "Hello support team,"]
DETAILS = ["", "", "", "I already tried the help pages.", "This started last {month}.",
           "My customer number is {num}.", "I have been a customer since {year}.",
           "My order number is {num}.", "I contacted you before about this.", "A friend has the same issue.",
           "I am writing from {city}."]
URGENT = ["Please fix this today, it is urgent.", "I need this solved immediately.",
          "This is urgent, I cannot work like this.", "Please help as soon as possible, it cannot wait.",
          "URGENT: my business depends on it.", "I need an answer within the hour.",
          "It is an emergency, please respond right away."]
CALM = ["", "Thanks.", "Thank you in advance.", "No rush, whenever you can.", "Kind regards.",
        "Thanks for your help.", "Best wishes.", "Let me know when you have a moment."]
NAMES = ["Ana", "Ben", "Chen", "Dana", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun", "Kofi", "Lena", "Marta",
         "Nils", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tomas"]


def answer(team: str, priority: str) -> str:
    return json.dumps({"team": team, "priority": priority})


def make_ticket(rng: random.Random, team: str, urgent: bool) -> str:
    slots = {
        "product": rng.choice(PRODUCTS),
        "amount": rng.choice(AMOUNTS),
        "month": rng.choice(MONTHS),
        "city": rng.choice(CITIES),
        "carrier": rng.choice(CARRIERS),
        "device": rng.choice(DEVICES),
        "error": rng.choice(ERRORS),
        "num": str(rng.randint(10000, 99999)),
        "year": str(rng.randint(2012, 2024)),
    }
    problem = rng.choice(PROBLEMS[team]).format(**slots)
    problem = problem[0].upper() + problem[1:]
    parts = [rng.choice(OPENINGS), problem, rng.choice(DETAILS).format(**slots)]
    parts.append(rng.choice(URGENT) if urgent else rng.choice(CALM))
    if rng.random() < 0.5:
        parts.append(rng.choice(NAMES))
    return " ".join(p for p in parts if p)


def row(ticket: str, team: str, priority: str, **meta: object) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"{INSTRUCTION}\n\n{ticket}"},
            {"role": "assistant", "content": answer(team, priority)},
        ],
        "metadata": {"task": "ticket-routing", "team": team, "priority": priority, **meta},
    }


def build() -> list[dict]:
    rng = random.Random(SEED)
    teams = list(PROBLEMS)
    rows: list[dict] = []
    seen: set[str] = set()
    while len(rows) < N_ROWS:
        team = teams[len(rows) % len(teams)]
        urgent = rng.random() < 0.4
        ticket = make_ticket(rng, team, urgent)
        if ticket in seen:
            continue
        seen.add(ticket)
        rows.append(row(ticket, team, "urgent" if urgent else "normal"))
    # planted rows the cleaners act on: contact details (scrubbed) ...
    rows[3]["messages"][0]["content"] += " You can reach me at dana.k@example.com."
    rows[10]["messages"][0]["content"] += " Call me back on 555-201-7734."
    rows[17]["messages"][0]["content"] += " My email is omar.r@example.org, phone 555-880-1290."
    # ... and exact duplicates (rejected)
    for i in (5, 50, 120, 200, 260):
        rows.append(json.loads(json.dumps(rows[i])))
    rng.shuffle(rows)
    return rows


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if quickstart.jsonl differs from what this writes")
    ap.add_argument("-o", "--output", type=Path, default=OUT)
    args = ap.parse_args(argv)
    text = render(build())
    if args.check:
        ok = args.output.exists() and args.output.read_text(encoding="utf-8") == text
        print("up to date" if ok else f"{args.output} is stale: run {Path(__file__).name}")
        return 0 if ok else 1
    tmp = args.output.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(args.output)
    print(f"wrote {text.count(chr(10))} rows to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
