"""Write the shipped tool-use demo dataset: weather, unit-conversion and calendar tools.

    python scripts/make_tool_data.py                       # -> edgetune/resources/demo/tool_calls.jsonl
    python scripts/make_tool_data.py /tmp/tools.jsonl 600  # another path / size

Every row declares the same three tools (OpenAI function schemas, already in edgetune's canonical
form: property names and argument keys sorted) and is one of:

* a single call that ends the conversation (the model must learn to call, with the right arguments);
* a call, the tool's result and the final answer built from it (the model must learn to answer
  from a result, without calling again);
* parallel calls (two cities, two conversions, or the weather and an event) in one assistant turn;
* a no-tool turn (greetings, general questions, thanks): the answer is plain text, no call.

Phrasings, cities, units, dates and titles are drawn from small hand-written lists with a fixed
seed, so the file is reproducible; exact duplicates are skipped.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "edgetune" / "resources" / "demo" / "tool_calls.jsonl"

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city.",
        "parameters": {"type": "object", "required": ["city"], "properties": {
            "city": {"type": "string", "description": "City name, e.g. Paris"},
            "unit": {"type": "string", "description": "Temperature unit", "enum": ["celsius", "fahrenheit"]}}}}},
    {"type": "function", "function": {
        "name": "convert_units", "description": "Convert a quantity from one unit to another.",
        "parameters": {"type": "object", "required": ["from_unit", "to_unit", "value"], "properties": {
            "from_unit": {"type": "string", "description": "Unit of the value, e.g. km"},
            "to_unit": {"type": "string", "description": "Unit wanted, e.g. miles"},
            "value": {"type": "number", "description": "The quantity to convert"}}}}},
    {"type": "function", "function": {
        "name": "create_event", "description": "Add an event to the user's calendar.",
        "parameters": {"type": "object", "required": ["date", "title"], "properties": {
            "date": {"type": "string", "description": "Day of the event, YYYY-MM-DD"},
            "time": {"type": "string", "description": "Start time, HH:MM (24 h)"},
            "title": {"type": "string", "description": "What the event is"}}}}},
]

CITIES = ["Paris", "Tokyo", "Berlin", "Lisbon", "Nairobi", "Toronto", "Sydney", "Madrid", "Oslo", "Cairo", "Lima",
          "Seoul", "Dublin", "Austin", "Mumbai", "Zurich", "Prague", "Denver", "Hanoi", "Accra", "Vienna", "Osaka"]
WEATHER_ASK = ["What's the weather in {c}?", "How is the weather in {c} right now?", "Is it raining in {c}?",
               "weather {c}", "Tell me the current weather for {c}.", "What's it like outside in {c} today?",
               "Do I need a jacket in {c}?", "Check the weather in {c} for me please"]
WEATHER_UNIT_ASK = ["What's the temperature in {c} in {u}?", "Weather in {c}, in {u} please.",
                    "How warm is it in {c}? Give me {u}.", "{c} weather in {u}?"]
UNITS = [("km", "miles", 0.621371), ("miles", "km", 1.609344), ("kg", "lb", 2.204623), ("lb", "kg", 0.453592),
         ("celsius", "fahrenheit", None), ("litres", "gallons", 0.264172), ("m", "ft", 3.28084), ("cm", "in", 0.393701),
         ("oz", "g", 28.349523)]
CONVERT_ASK = ["Convert {v} {a} to {b}.", "How many {b} is {v} {a}?", "What is {v} {a} in {b}?",
               "{v} {a} to {b}", "Can you turn {v} {a} into {b}?", "I have {v} {a}, how much is that in {b}?"]
TITLES = ["Dentist", "Team standup", "Lunch with Ana", "Gym", "Project review", "Call mom", "Yoga class",
          "Flight to Rome", "Book club", "Car service", "Piano lesson", "Budget meeting"]
EVENT_ASK = ["Add '{t}' to my calendar on {d} at {h}.", "Schedule {t} for {d} at {h}.",
             "Put {t} in my calendar, {d}, {h}.", "Create an event called {t} on {d} at {h}."]
EVENT_NO_TIME_ASK = ["Add '{t}' to my calendar on {d}.", "Remind me of {t} on {d}, put it in the calendar.",
                     "Book {t} on {d}."]
SKIES = ["clear", "cloudy", "light rain", "sunny", "windy", "foggy", "snow showers"]
NO_TOOL = [
    ("Hi!", "Hello! I can check the weather, convert units or add events to your calendar. What do you need?"),
    ("Thanks, that's all.", "You're welcome! Have a good day."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("Tell me a joke.", "Why did the scarecrow win an award? Because he was outstanding in his field."),
    ("What can you do?", "I can look up the current weather in a city, convert between units, and add events to your calendar."),
    ("How many days are in a week?", "A week has seven days."),
    ("What is 12 times 12?", "12 times 12 is 144."),
    ("Good morning", "Good morning! How can I help you today?"),
    ("Say hello in Spanish.", "Hola!"),
    ("What colour is the sky on a clear day?", "On a clear day the sky is blue."),
    ("Is a tomato a fruit?", "Yes: botanically a tomato is a fruit, though it is cooked like a vegetable."),
    ("How many minutes are in an hour?", "There are 60 minutes in an hour."),
    ("Name a primary colour.", "Red is a primary colour."),
    ("What's the opposite of hot?", "The opposite of hot is cold."),
    ("Can you help me?", "Of course. Ask me about the weather, a unit conversion or your calendar."),
    ("What is the largest ocean?", "The Pacific Ocean is the largest ocean."),
    ("How do you say thank you in French?", "Thank you in French is \"merci\"."),
    ("What is the boiling point of water at sea level?", "Water boils at 100 °C (212 °F) at sea level."),
    ("Which planet is closest to the sun?", "Mercury is the planet closest to the sun."),
    ("Recommend a good book.", "Try \"The Hobbit\" by J.R.R. Tolkien: a short, classic adventure."),
    ("What does CPU stand for?", "CPU stands for central processing unit."),
    ("Spell the word 'necessary'.", "N-E-C-E-S-S-A-R-Y."),
    ("What's 15% of 200?", "15% of 200 is 30."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa."),
    ("Give me a synonym for happy.", "Joyful."),
    ("How many continents are there?", "There are seven continents."),
    ("Write a haiku about rain.", "Soft rain on the roof,\nthe garden drinks in silence,\npuddles hold the sky."),
]
NO_TOOL_PREFIX = ["", "", "Hey, ", "Quick question: ", "Hello! ", "Sorry to bother you. "]


class Ids:
    """Call ids: 9 alphanumerics (the shortest form every family accepts, Mistral's included)."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def __call__(self) -> str:
        return "".join(self.rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(9))


def call(ids: Ids, name: str, **arguments) -> dict:
    return {"id": ids(), "type": "function", "function": {"name": name, "arguments": dict(sorted(arguments.items()))}}


def fmt_num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else round(x, 2)


def weather(rng, ids) -> tuple[str, dict, str, str]:
    c = rng.choice(CITIES)
    if rng.random() < 0.35:
        u = rng.choice(["celsius", "fahrenheit"])
        q = rng.choice(WEATHER_UNIT_ASK).format(c=c, u=u)
        tc = call(ids, "get_weather", city=c, unit=u)
    else:
        u = "celsius"
        q = rng.choice(WEATHER_ASK).format(c=c)
        tc = call(ids, "get_weather", city=c)
    t = rng.randint(-5, 34)
    t = round(t * 9 / 5 + 32) if u == "fahrenheit" else t
    sky = rng.choice(SKIES)
    result = json.dumps({"city": c, "sky": sky, "temperature": t, "unit": u})
    answer = f"It is {t}°{'F' if u == 'fahrenheit' else 'C'} and {sky} in {c}."
    return q, tc, result, answer


def convert(rng, ids) -> tuple[str, dict, str, str]:
    a, b, f = rng.choice(UNITS)
    v = rng.choice([rng.randint(1, 500), round(rng.uniform(0.5, 99), 1)])
    q = rng.choice(CONVERT_ASK).format(v=v, a=a, b=b)
    tc = call(ids, "convert_units", from_unit=a, to_unit=b, value=v)
    out = v * 9 / 5 + 32 if f is None else v * f
    result = json.dumps({"unit": b, "value": fmt_num(round(out, 2))})
    return q, tc, result, f"{v} {a} is {fmt_num(round(out, 2))} {b}."


def event(rng, ids) -> tuple[str, dict, str, str]:
    t = rng.choice(TITLES)
    d = f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    if rng.random() < 0.7:
        h = f"{rng.randint(7, 20):02d}:{rng.choice(['00', '15', '30', '45'])}"
        q = rng.choice(EVENT_ASK).format(t=t, d=d, h=h)
        tc = call(ids, "create_event", date=d, time=h, title=t)
        when = f"{d} at {h}"
    else:
        q = rng.choice(EVENT_NO_TIME_ASK).format(t=t, d=d)
        tc = call(ids, "create_event", date=d, title=t)
        when = d
    result = json.dumps({"created": True, "event_id": rng.randint(100, 999)})
    return q, tc, result, f"Done: '{t}' is in your calendar on {when}."


KINDS = (weather, convert, event)


def row(rng: random.Random) -> dict:
    ids = Ids(rng)
    r = rng.random()
    if r < 0.22:  # no tool needed
        q, a = rng.choice(NO_TOOL)
        q = rng.choice(NO_TOOL_PREFIX) + q
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "tools": TOOLS}
    if r < 0.35:  # parallel calls
        f1, f2 = rng.choice([(weather, weather), (convert, convert), (weather, event), (convert, weather)])
        (q1, c1, r1, a1), (q2, c2, r2, a2) = f1(rng, ids), f2(rng, ids)
        if c1["function"] == c2["function"]:
            return row(rng)
        q = f"{q1.rstrip('?.!')}, and also: {q2[0].lower() + q2[1:]}"
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": "", "tool_calls": [c1, c2]}]
        if rng.random() < 0.5:
            msgs += [{"role": "tool", "content": r1, "tool_call_id": c1["id"], "name": c1["function"]["name"]},
                     {"role": "tool", "content": r2, "tool_call_id": c2["id"], "name": c2["function"]["name"]},
                     {"role": "assistant", "content": f"{a1} {a2}"}]
        return {"messages": msgs, "tools": TOOLS}
    q, c, res, a = rng.choice(KINDS)(rng, ids)
    msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": "", "tool_calls": [c]}]
    if rng.random() < 0.4:  # the result comes back: answer from it
        msgs += [{"role": "tool", "content": res, "tool_call_id": c["id"], "name": c["function"]["name"]},
                 {"role": "assistant", "content": a}]
    return {"messages": msgs, "tools": TOOLS}


def make(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        r = row(rng)
        key = json.dumps([(m["role"], m["content"]) for m in r["messages"][:1]] +
                         [m.get("tool_calls", [{}])[0].get("function") for m in r["messages"][1:2]], sort_keys=True)
        if key in seen:
            continue  # exact duplicates would be removed by `data prepare` anyway
        seen.add(key)
        rows.append(r)
    return rows


def main(argv: list[str]) -> None:
    out = Path(argv[1]) if len(argv) > 1 else OUT
    n = int(argv[2]) if len(argv) > 2 else 400
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in make(n):
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(out)
    print(f"wrote {n} rows to {out}")


if __name__ == "__main__":
    main(sys.argv)
