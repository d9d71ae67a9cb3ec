"""English text made here from a seed: the long context the sample prompt files cut to length, and random
word prompts for the serving benchmark.

Written in code rather than downloaded so the shipped files are ours to redistribute and nothing touches
the network at run time; `python -m bench.textgen` rewrites bench/prompts/logbook.txt byte for byte.
The text is a lighthouse keeper's logbook: varied, readable English with facts a model can be asked about
(which ship passed on which day, what supplies came), so long-context answers can be judged by eye.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

LOGBOOK_PATH = Path(__file__).with_name("prompts") / "logbook.txt"
LOGBOOK_SEED = 1848
LOGBOOK_DAYS = 1800  # enough for a 128k-token context with room to spare

KEEPERS = ("Keeper Mara Ilves", "Assistant Tomas Reyna", "Relief keeper Edvin Salo", "Apprentice Petra Quill")
WIND_DIRECTIONS = ("north", "north-east", "east", "south-east", "south", "south-west", "west", "north-west")
SEA_STATES = ("calm", "smooth", "slight", "moderate", "rough", "very rough", "high")
VISIBILITY = ("excellent", "good", "fair", "poor", "very poor")
SHIPS = ("Heron", "Saint Brendan", "Marigold", "Northern Star", "Kestrel", "Good Intent", "Albatross", "Juniper")
VESSELS = ("schooner", "steam packet", "fishing smack", "collier", "brigantine", "revenue cutter")
SUPPLIES = ("lamp oil", "flour", "salted fish", "coal", "candles", "potatoes", "fresh water", "tinned milk")
BIRDS = ("gannets", "puffins", "kittiwakes", "cormorants", "storm petrels", "herring gulls", "terns")
REPAIRS = (
    "repaired the hinge on the lantern room door",
    "replaced two cracked panes in the gallery windows",
    "cleaned the soot from the lens with spirit and soft cloth",
    "oiled the clockwork that turns the light",
    "tarred the roof of the oil store",
    "mended the rope on the landing crane",
    "scraped rust from the iron railings and painted them",
    "fitted a new wick to the burner",
)
TIMES = ("dawn", "half past six", "mid-morning", "noon", "two in the afternoon", "dusk", "nine at night", "midnight")
CLOSINGS = (
    "Nothing else of note.",
    "The light was lit at sunset and burned steadily all night.",
    "All hands in good health.",
    "The barometer fell slowly through the evening.",
    "A quiet watch, and the stove drew well.",
    "Rain on and off; the cistern is nearly full.",
    "Fog horn sounded for an hour after dusk.",
    "Letters written for the next boat.",
    "The cat caught a rat in the store room.",
    "Read the Almanac by the lamp until the change of watch.",
)


def _day_entry(day: int, rng: random.Random) -> str:
    keeper = rng.choice(KEEPERS)
    sentences = [
        f"Day {day}.",
        f"Wind from the {rng.choice(WIND_DIRECTIONS)}, force {rng.randint(1, 9)}; sea {rng.choice(SEA_STATES)}; "
        f"visibility {rng.choice(VISIBILITY)} until {rng.choice(TIMES)}.",
    ]
    events = [
        lambda: f"{keeper} {rng.choice(REPAIRS)}.",
        lambda: f"The {rng.choice(VESSELS)} {rng.choice(SHIPS)} passed to the {rng.choice(WIND_DIRECTIONS)} "
        f"of the rock at {rng.choice(TIMES)} and dipped her flag.",
        lambda: f"The supply boat landed {rng.randint(2, 40)} crates of {rng.choice(SUPPLIES)}.",
        lambda: f"Counted {rng.randint(3, 300)} {rng.choice(BIRDS)} on the north ledge.",
        lambda: f"The lamp burned {rng.randint(9, 31)} litres of oil through the night.",
        lambda: f"{keeper} walked the causeway at low water and found it sound.",
    ]
    for event in rng.sample(events, rng.randint(2, 4)):
        sentences.append(event())
    sentences.append(rng.choice(CLOSINGS))
    return " ".join(sentences)


def logbook(days: int = LOGBOOK_DAYS, seed: int = LOGBOOK_SEED) -> str:
    """The logbook's first `days` entries, one paragraph each; the same text for the same seed."""
    rng = random.Random(seed)
    return "\n\n".join(_day_entry(day, rng) for day in range(1, days + 1)) + "\n"


# Common English words that are one token in the usual BPE vocabularies (Llama 3, GPT-2, SmolLM2),
# so a prompt of n random words is close to n tokens.
WORDS = tuple(
    """time year people way day man thing woman life child world school state family student group country
    problem hand part place case week company system program question work government number night point
    home water room mother area money story fact month lot right study book eye job word business issue
    side kind head house service friend father power hour game line end member law car city community name
    president team minute idea kid body information back parent face others level office door health person
    art war history party result change morning reason research girl guy moment air teacher force education
    good new first last long great little own other old right big high different small large next early young
    important few public bad same able red blue green light dark open close run walk read write sing play
    think know take see come want look use find give tell call try ask need feel become leave put mean keep
    let begin seem help talk turn start show hear move live believe hold bring happen stand lose pay meet
    include continue set learn lead understand watch follow stop create speak spend grow offer remember love
    consider appear buy wait serve die send expect build stay fall cut reach kill remain suggest raise pass
    sell require report decide pull river stone bread winter summer garden window table paper music voice""".split()
)


def random_words(n: int, rng: random.Random) -> str:
    """n words drawn uniformly from WORDS, space separated."""
    return " ".join(rng.choices(WORDS, k=n))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Rewrite the generated long-context text the sample prompts use.")
    parser.add_argument("--out", type=Path, default=LOGBOOK_PATH, help="where to write (default: %(default)s)")
    parser.add_argument("--days", type=int, default=LOGBOOK_DAYS, help="logbook entries (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.days < 1:  # 0 wrote a 1-byte logbook, which the long prompt files then cut to nothing
        parser.error(f"--days must be at least 1, not {args.days}")
    if not args.out.absolute().parent.is_dir():
        parser.error(f"--out {args.out}: the folder {args.out.absolute().parent} does not exist")
    args.out.write_text(logbook(args.days), encoding="utf-8")
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
