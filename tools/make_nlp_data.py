"""Write the chapter-7 English NLP data sets (``data/nlp/*.tsv``) from templates, seeded.

Run ``python tools/make_nlp_data.py`` from the repository root; the output is
deterministic (``random.Random(SEED)``), so re-running reproduces the committed
files byte for byte. Every template, name and place below was written for the
course (CC BY 4.0, like the rest of ``data/``); see ``data/README.md``.
"""

from __future__ import annotations

import random
from pathlib import Path

SEED = 7
OUT = Path(__file__).resolve().parent.parent / "data" / "nlp"

CITIES = [
    "Paris",
    "Berlin",
    "Lisbon",
    "Nairobi",
    "Toronto",
    "Osaka",
    "Lima",
    "Dublin",
    "Cairo",
    "Seoul",
    "Madrid",
    "Oslo",
    "Chicago",
    "Mumbai",
    "Sydney",
    "Prague",
    "Boston",
    "Hanoi",
    "New York",
    "Cape Town",
    "Buenos Aires",
    "Kuala Lumpur",
]
PEOPLE = [
    "Maria Lopez",
    "James Carter",
    "Aiko Tanaka",
    "Omar Haddad",
    "Lena Fischer",
    "Ravi Patel",
    "Grace Okafor",
    "Tom Becker",
    "Sofia Rossi",
    "Chen Wei",
    "Anna Novak",
    "David Kim",
    "Fatima Noor",
    "Lucas Silva",
    "Emma Walsh",
    "Kenji Mori",
    "Nina Petrova",
    "Paul Dubois",
]
ORGS = [
    "Acme Bank",
    "Northwind Traders",
    "Blue River Foods",
    "Orbit Airlines",
    "Greenleaf Clinic",
    "Summit Motors",
    "Harbor Insurance",
    "Pixel Labs",
    "Maple Hospital",
    "Silverline Rail",
    "Bright Path School",
    "Crescent Media",
    "Atlas Energy",
    "Redwood Bakery",
]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
TIMES = ["6 am", "6:30 am", "7 am", "7:15 am", "8 am", "9:30 am", "noon", "5 pm", "10 pm"]
SONGS = [
    "some jazz",
    "the new Adele album",
    "relaxing piano music",
    "my running playlist",
    "something by the Beatles",
    "classical music",
    "a podcast about history",
    "lo-fi beats",
]
FOODS = ["pizza", "sushi", "a vegetarian curry", "pad thai", "tacos", "a burger", "pho", "ramen"]
ITEMS = [
    "a pair of running shoes",
    "a winter jacket",
    "a phone charger",
    "a coffee grinder",
    "new headphones",
    "a desk lamp",
    "a backpack",
    "a yoga mat",
]
SYMPTOMS = [
    "a headache",
    "a sore throat",
    "a fever",
    "back pain",
    "a bad cough",
    "trouble sleeping",
]

# ------------------------------------------------------------------ classification
INTENTS: dict[str, list[str]] = {
    "weather": [
        "Will it rain in {city} tomorrow?",
        "What is the weather like in {city} this weekend?",
        "Do I need an umbrella in {city} on {day}?",
        "How cold will it get tonight in {city}?",
        "Is there a storm warning for {city}?",
        "Tell me the forecast for {city} on {day}.",
        "Should I expect snow in {city} this week?",
        "How hot is it going to be in {city} on {day} afternoon?",
    ],
    "music": [
        "Play {song}, please.",
        "Can you put on {song}?",
        "I want to listen to {song} while I cook.",
        "Turn up the volume and play {song}.",
        "Skip this track and play {song} instead.",
        "Start {song} in the living room.",
        "Shuffle {song} for the next hour.",
        "Could you queue {song} after this song?",
    ],
    "alarm": [
        "Wake me up at {time} tomorrow.",
        "Set an alarm for {time} on {day}.",
        "Cancel my {time} alarm.",
        "Remind me to stretch at {time}.",
        "Move my alarm from {time} to a bit later.",
        "Please set a timer that ends at {time}.",
        "I need an alarm at {time} every {day}.",
        "Snooze the alarm and ring again at {time}.",
    ],
    "travel": [
        "Book a flight to {city} for next {day}.",
        "How long is the train ride from {city} to {city2}?",
        "Find me a cheap hotel in {city} for two nights.",
        "Are there direct flights from {city} to {city2}?",
        "I need a rental car when I land in {city}.",
        "What is the earliest bus to {city} on {day}?",
        "Change my ticket to {city} to a later date.",
        "Which airport in {city} is closest to the center?",
    ],
    "restaurant": [
        "Order {food} for delivery tonight.",
        "Is there a good place for {food} near me?",
        "Reserve a table for four at a {food} restaurant on {day}.",
        "How long will my {food} take to arrive?",
        "I would like to order {food} and a salad.",
        "Which restaurants in {city} serve {food}?",
        "Cancel my dinner reservation for {day}.",
        "Can I get {food} delivered before {time}?",
    ],
    "banking": [
        "What is the balance on my checking account after {day}?",
        "Transfer fifty dollars to {person}.",
        "Why was my card declined in {city}?",
        "Show me the transactions I made in {city}.",
        "I think someone stole my credit card in {city}.",
        "Send the rent to {person} on {day}.",
        "How much did I pay {person} since {day}?",
        "Freeze my debit card until {day}, I lost it in {city}.",
    ],
    "shopping": [
        "Add {item} to my shopping cart.",
        "Where is my order of {item}?",
        "I want to return {item} I bought last week.",
        "Find {item} under forty dollars.",
        "Is {item} in stock at the store in {city}?",
        "Compare prices for {item}.",
        "Buy {item} and ship it by {day}.",
        "Do you have a discount code for {item}?",
    ],
    "health": [
        "I have had {symptom} since {day}, what should I do?",
        "Book a doctor's appointment for {day} morning.",
        "Is it safe to take ibuprofen for {symptom}?",
        "Find a pharmacy in {city} that is open now.",
        "Remind me to take my medicine at {time}.",
        "What are common causes of {symptom}?",
        "My child woke up with {symptom}.",
        "How many steps did I walk on {day}?",
    ],
}

# ------------------------------------------------------------------ NER (BIO)
NER_TEMPLATES = [
    "{PER} moved to {LOC} in {DATE} .",
    "{PER} joined {ORG} on {DATE} .",
    "{ORG} opened a new office in {LOC} last {DATE} .",
    "On {DATE} , {PER} flew from {LOC} to {LOC} .",
    "{PER} and {PER} met at the {ORG} headquarters in {LOC} .",
    "The mayor of {LOC} thanked {ORG} for the donation .",
    "{ORG} hired {PER} as its new director in {DATE} .",
    "{PER} will speak in {LOC} on {DATE} .",
    "According to {PER} , {ORG} expects higher sales after {DATE} .",
    "A storm closed the roads between {LOC} and {LOC} on {DATE} .",
    "{PER} works for {ORG} and lives near {LOC} .",
    "Tickets for the concert in {LOC} go on sale on {DATE} .",
    "{ORG} and {ORG} signed an agreement in {LOC} .",
    "{PER} was born in {LOC} on {DATE} .",
    "Yesterday {PER} called {PER} about the meeting .",
    "The report from {ORG} was published in {DATE} .",
]


def ner_date(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return f"{rng.choice(MONTHS)} {rng.randint(1, 28)}"
    if kind == 1:
        return f"{rng.choice(MONTHS)} {rng.randint(1995, 2025)}"
    if kind == 2:
        return rng.choice(DAYS)
    return f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(1995, 2025)}"


def ner_sentence(template: str, rng: random.Random) -> tuple[list[str], list[str]]:
    tokens, tags = [], []
    for piece in template.split():
        if piece.startswith("{") and piece.endswith("}"):
            label = piece[1:-1]
            value = {
                "PER": lambda: rng.choice(PEOPLE),
                "LOC": lambda: rng.choice(CITIES),
                "ORG": lambda: rng.choice(ORGS),
                "DATE": lambda: ner_date(rng),
            }[label]()
            words = value.split()
            tokens += words
            tags += [f"B-{label}"] + [f"I-{label}"] * (len(words) - 1)
        else:
            tokens.append(piece)
            tags.append("O")
    return tokens, tags


# ------------------------------------------------------------------ retrieval
RETRIEVAL = [
    (
        "When does the public library in {city} open on {day}?",
        "On {day} the public library in {city} opens its doors at {opening} and closes at eight in the evening.",
    ),
    (
        "How do I renew my passport in {city}?",
        "Residents of {city} renew a passport at the city service center; bring the old passport and a recent photo.",
    ),
    (
        "Who founded {org}?",
        "{org} was founded by {person}, who started it with two colleagues in a small office in {city}.",
    ),
    (
        "What is the best season to visit {city}?",
        "Most travellers find {month} the most pleasant month in {city}, with mild days and few crowds.",
    ),
    (
        "How can I reset the password of my {org} account?",
        "To reset a {org} password, open the login page, choose 'forgot password' and follow the link sent by email.",
    ),
    (
        "Where is the main train station in {city}?",
        "The main train station of {city} sits near the old town, a ten-minute walk from the river.",
    ),
    (
        "What does {person} do at {org}?",
        "At {org}, {person} leads the team that plans new products and reports to the board.",
    ),
    (
        "How long should I boil an egg for a soft yolk?",
        "For a soft yolk, lower the egg into boiling water and cook it for about six minutes, then cool it.",
    ),
    (
        "Why is my {item} not charging?",
        "If {item} does not charge, check the cable, try another socket and clean the port gently.",
    ),
    (
        "How often should I water a cactus?",
        "A cactus needs water only every two to three weeks in summer and even less in winter.",
    ),
    (
        "Can I bring a dog on the {org} trains?",
        "Small dogs travel free on {org} trains if they stay in a carrier; larger dogs need a ticket.",
    ),
    (
        "What time does the farmers market in {city} close?",
        "The farmers market in {city} runs every {day} morning and packs up around {time}.",
    ),
    (
        "How do I cancel my {org} subscription?",
        "You can cancel a {org} subscription at any time from the account settings page; no fee is charged.",
    ),
    (
        "Is there a museum about science in {city}?",
        "{city} has a hands-on science museum with a planetarium, popular with school groups.",
    ),
    (
        "What should I pack for a hiking trip in {month}?",
        "For hiking in {month}, pack layers, a rain jacket, sturdy boots and plenty of water.",
    ),
]


def fill(template: str, slots: dict[str, str]) -> str:
    return template.format(**slots)


def main() -> None:
    rng = random.Random(SEED)
    OUT.mkdir(parents=True, exist_ok=True)

    # classification: every template with 8 fillings, deduplicated, 70/30 split per class
    rows = []
    for label, templates in INTENTS.items():
        seen: set[str] = set()
        for template in templates:
            for _ in range(8):
                city, city2 = rng.sample(CITIES, 2)
                text = template.format(
                    city=city,
                    city2=city2,
                    day=rng.choice(DAYS),
                    time=rng.choice(TIMES),
                    song=rng.choice(SONGS),
                    food=rng.choice(FOODS),
                    item=rng.choice(ITEMS),
                    person=rng.choice(PEOPLE).split()[0],
                    symptom=rng.choice(SYMPTOMS),
                )
                if text not in seen:
                    seen.add(text)
                    rows.append((label, text))
    by_label: dict[str, list[str]] = {}
    for label, text in rows:
        by_label.setdefault(label, []).append(text)
    with open(OUT / "classification.tsv", "w", encoding="utf-8") as f:
        f.write("split\tlabel\ttext\n")
        for label, texts in by_label.items():
            rng.shuffle(texts)
            cut = round(0.7 * len(texts))
            for i, text in enumerate(texts):
                f.write(f"{'train' if i < cut else 'test'}\t{label}\t{text}\n")

    # NER: 360 sentences, 70/30 split
    with open(OUT / "ner.tsv", "w", encoding="utf-8") as f:
        f.write("split\ttokens\ttags\n")
        for i in range(360):
            tokens, tags = ner_sentence(rng.choice(NER_TEMPLATES), rng)
            split = "train" if i % 10 < 7 else "test"
            f.write(f"{split}\t{' '.join(tokens)}\t{' '.join(tags)}\n")

    # retrieval: each template filled 10 times with distinct slots
    with open(OUT / "retrieval.tsv", "w", encoding="utf-8") as f:
        f.write("query\tpassage\n")
        pairs: set[tuple[str, str]] = set()
        for query, passage in RETRIEVAL:
            made, tries = 0, 0
            while made < 10 and tries < 200:
                tries += 1
                slots = {
                    "city": rng.choice(CITIES),
                    "day": rng.choice(DAYS),
                    "time": rng.choice(TIMES),
                    "opening": rng.choice(TIMES[:6]),
                    "org": rng.choice(ORGS),
                    "person": rng.choice(PEOPLE),
                    "month": rng.choice(MONTHS),
                    "item": rng.choice(ITEMS),
                }
                pair = (fill(query, slots), fill(passage, slots))
                if pair not in pairs and all(pair[0] != p[0] for p in pairs):
                    pairs.add(pair)
                    f.write(f"{pair[0]}\t{pair[1]}\n")
                    made += 1


if __name__ == "__main__":
    main()
