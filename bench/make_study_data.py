"""Write the three small classification tasks of the defaults study (loralab/data/study_*.jsonl).

Each task has its own sentence templates per class; the training file and the held-out file use different
templates (so held-out accuracy measures more than memorised wording), filled from the same word lists.
Deterministic (seed 0): running it again rewrites identical files.

    python bench/make_study_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "loralab" / "data"

PRODUCTS = ["blender", "pair of headphones", "backpack", "desk lamp", "kettle", "phone case", "pair of running shoes",
            "keyboard", "rice cooker", "tent", "office chair", "water bottle"]
PARTS = ["battery", "handle", "zipper", "cable", "lid", "strap", "button", "hinge", "cushion", "switch"]

# ---- reviews: positive / negative / mixed ------------------------------------------------------------------
REVIEWS = {
    "positive": (
        ["I was worried the {p} would be flimsy, but it has held up perfectly.",
         "Not a single complaint about this {p}; even the {f} feels solid.",
         "Bought a second {p} for my sister because the first one is so good.",
         "The {f} on this {p} is better than I expected for the price.",
         "I can't think of anything bad to say about the {p}.",
         "It isn't cheap, but the {p} is worth every penny.",
         "Six months in and the {p} still works like the day it arrived.",
         "I returned two other brands before finding this {p}, and I'm finally happy.",
         "No more broken {f}s for me: this {p} is built to last.",
         "My whole family uses the {p} daily and nobody has had a problem.",
         "The {p} arrived early, works flawlessly and the {f} is sturdy."],
        ["Honestly the best {p} I have owned; the {f} never gave me trouble.",
         "I doubted the reviews, yet the {p} turned out to be excellent.",
         "Would happily buy this {p} again, nothing about it disappoints.",
         "Everything about the {p}, the {f} included, is well made."]),
    "negative": (
        ["The {f} broke after two days, so the {p} went straight back.",
         "I wanted to love this {p}, but it stopped working within a week.",
         "Don't waste your money on this {p}.",
         "The {p} looks nice in the photos, and that is the only nice thing about it.",
         "Customer service never answered about my dead {p}.",
         "The {f} is so bad that the {p} is unusable.",
         "The {p} arrived scratched and the {f} rattles.",
         "I expected much more; the {p} feels cheap and the {f} is loose.",
         "After a month the {f} snapped and the {p} is now in the bin.",
         "Not worth it: the {p} failed on its first real use.",
         "Nothing good to report, the {p} is a disappointment from start to finish."],
        ["I regret buying this {p}; the {f} came off on day one.",
         "Avoid this {p}, mine died before the return window closed.",
         "The {p} is poorly made and the {f} does not even fit.",
         "Save yourself the trouble and skip this {p} entirely."]),
    "mixed": (
        ["The {f} is excellent, but the {p} is far too heavy.",
         "Great {f}, terrible {g}; I'm keeping the {p} for now.",
         "The {p} works well, although the {f} wore out sooner than I hoped.",
         "Love the design of the {p}, hate the {f}.",
         "Good {p} for the price, but the {f} could be much better.",
         "The {p} does the job, yet the {f} already shows wear.",
         "Some parts of the {p} are brilliant and the {f} is awful.",
         "Solid {p} overall, though I had to replace the {f} twice.",
         "The {f} is fine and the {g} is flimsy, so the {p} is a mixed bag.",
         "I like the {p}, but I can't recommend it with that {f}.",
         "Works as advertised, but the {p} is louder than I would like and the {f} squeaks."],
        ["A decent {p}, let down by a weak {f}.",
         "The {p} is lovely to use, shame about the {f}.",
         "Pleased with the {g}, unhappy with the {f}; the {p} is just okay.",
         "Half of this {p} is great, the {f} is the other half."]),
}

# ---- questions: cooking / gardening / cycling / money ------------------------------------------------------
TOPICS = {
    "cooking": ["my bread dough", "the risotto", "a sourdough starter", "caramel", "the roast chicken",
                "homemade pasta", "the curry", "pancake batter"],
    "gardening": ["my tomato plants", "the lawn", "a rose bush", "the compost heap", "seedlings",
                  "an apple tree", "the basil on my windowsill", "raised beds"],
    "cycling": ["my bike chain", "the rear derailleur", "a flat tyre", "disc brakes", "my saddle height",
                "a long ride", "the gears", "tubeless tyres"],
    "money": ["my savings account", "an index fund", "my credit card debt", "a monthly budget", "my pension",
              "the mortgage", "an emergency fund", "my tax return"],
}
QUESTION_TEMPLATES = (
    ["How often should I check {x}?", "What is the most common mistake people make with {x}?",
     "Why does {x} keep going wrong for me?", "Is it worth spending more time on {x}?",
     "What should a beginner know about {x}?", "Can I fix {x} myself or should I ask an expert?",
     "What do I do if {x} gets worse over winter?", "Any tips for getting {x} right the first time?",
     "How much should I expect to spend on {x}?", "Is there a quick way to improve {x}?"],
    ["What's the first thing to look at when {x} fails?", "Who can I ask for help with {x}?",
     "Should I worry about {x} this week?", "How did you learn to handle {x}?"])

# ---- support messages: refund / delivery / login / cancel --------------------------------------------------
ITEMS = ["order", "parcel", "jacket", "subscription box", "gift card", "laptop stand", "monitor", "book set"]
SUPPORT = {
    "refund": (
        ["I returned the {i} last week and still have not got my money back.",
         "Please send the money for the {i} back to my card.",
         "The {i} was faulty, so I want a refund, not a replacement.",
         "You charged me twice for one {i}; I need one payment reversed.",
         "How long does it take for the refund on my {i} to appear?",
         "I'd like my money back for the {i}, it was not as described.",
         "The {i} was cancelled but the charge is still on my statement.",
         "Can you reimburse the shipping fee for the damaged {i}?",
         "I was promised a credit for the late {i} and it never came.",
         "My bank shows the payment for the {i} but you said it was refunded."],
        ["Still waiting for the money from the {i} I sent back.",
         "Please reverse the payment for the {i}, I returned it unopened.",
         "Where is my refund for the broken {i}?",
         "I want to be paid back for the {i} that never worked."]),
    "delivery": (
        ["The tracking page for my {i} has not changed in five days.",
         "When will my {i} arrive? It was due on Monday.",
         "The courier says the {i} was delivered but nothing is at my door.",
         "Can you send the {i} to my office instead of my home?",
         "My {i} seems to be stuck at the depot.",
         "I paid for express shipping and the {i} is still not here.",
         "The {i} went to my old address; can it be redirected?",
         "Is there a delivery date for the {i} yet?",
         "The driver left the {i} with a neighbour I don't know.",
         "Half of my {i} arrived and the rest is missing."],
        ["No sign of my {i} and the estimated date has passed.",
         "Could the {i} be delivered on Saturday instead?",
         "Where exactly is my {i} right now?",
         "The {i} is marked as in transit for over a week."]),
    "login": (
        ["I can't sign in to see my {i}; the password reset email never arrives.",
         "My account is locked after too many attempts, and I need to check my {i}.",
         "The two-factor code is not accepted, so I cannot reach my {i}.",
         "I changed my email address and now I cannot log in to manage the {i}.",
         "Every time I log in to look at the {i} it sends me back to the start page.",
         "Someone else may have accessed my account; the {i} details were changed.",
         "The app says my password is wrong although I just reset it.",
         "I no longer have the phone number used for verification on my account.",
         "I get an error when I try to sign in to track the {i}.",
         "How do I unlock my account? I want to see the {i} invoice."],
        ["Locked out of my account again, can't even open the {i} page.",
         "The login link expired before I could use it to view my {i}.",
         "My password doesn't work anymore and I need my {i} receipt.",
         "Please help me get back into my account to check the {i}."]),
    "cancel": (
        ["Please stop my {i} from renewing next month.",
         "I want to end my membership before the next {i} ships.",
         "How do I cancel the {i} I ordered an hour ago?",
         "Don't send the {i}; I changed my mind and want to call it off.",
         "Close my account and stop all future {i} deliveries.",
         "I'd like to pause or end the {i} plan, whichever is quicker.",
         "Cancel the {i} before it leaves the warehouse, please.",
         "I no longer need the {i}; please terminate the order.",
         "Unsubscribe me from the monthly {i}, effective now.",
         "Can I still cancel the {i} if it was dispatched this morning?"],
        ["Stop the {i} order, I don't want it anymore.",
         "End my {i} plan at the close of this billing period.",
         "I'd like to call off the {i} I placed yesterday.",
         "Please make sure no more {i} shipments are sent to me."]),
}


def _fill(template: str, rng: random.Random, words: list[str], parts: list[str] | None = None) -> str:
    f, g = rng.sample(parts, 2) if parts else (None, None)
    return template.format(p=rng.choice(words), i=rng.choice(words), x=rng.choice(words), f=f, g=g)


def _task(classes: dict, n_train: int, n_eval: int, rng: random.Random, words, parts=None):
    """classes: {label: (train templates, eval templates)} -> (train rows, eval rows), balanced, shuffled."""
    out = []
    for n, which in ((n_train, 0), (n_eval, 1)):
        rows, seen = [], set()
        per_class = n // len(classes)
        for label, templates in classes.items():
            made = 0
            while made < per_class:
                text = _fill(rng.choice(templates[which]), rng, words(label) if callable(words) else words, parts)
                if text not in seen:
                    seen.add(text)
                    rows.append({"text": text, "label": label})
                    made += 1
        rng.shuffle(rows)
        out.append(rows)
    return out


def main() -> None:
    rng = random.Random(0)
    tasks = {
        "reviews": _task(REVIEWS, 201, 60, rng, PRODUCTS, PARTS),
        "questions": _task({t: QUESTION_TEMPLATES for t in TOPICS}, 200, 60, rng, lambda label: TOPICS[label]),
        "support": _task(SUPPORT, 200, 60, rng, ITEMS),
    }
    for name, (train_rows, eval_rows) in tasks.items():
        for split, rows in (("train", train_rows), ("heldout", eval_rows)):
            path = DATA / f"study_{name}_{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            print(f"{path}: {len(rows)} rows")


if __name__ == "__main__":
    main()
