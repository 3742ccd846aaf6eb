"""General-domain English for pretraining the embedded base model.

Short documents about weather, cities, cooking, travel, science, sports,
nature, history, work, markets and everyday health, built from sentence
templates with numbers, times, acronyms and a little list formatting, so the
model sees digits, colons, slashes and capitals as well as common words. The
health documents are encyclopedic ("Symptoms of asthma can include ..."): they
share words with clinical notes but none of their structure (no "Chief
complaint:" headers, doses or "Pt"/"HTN" shorthand), so notes stay new to the
base model and fine-tuning on them has something to learn.
"""

from __future__ import annotations

import random
import re
import string

from simulation.specialties import VOCABULARY

NUM_DOCUMENTS = 1500

_FILLS: dict[str, tuple[str, ...]] = {
    "city": ("Lisbon", "Oslo", "Nairobi", "Kyoto", "Toronto", "Lima", "Dublin", "Seoul", "Cairo", "Melbourne",
             "Vienna", "Chicago", "Hanoi", "Prague", "Denver", "Accra", "Madrid", "Helsinki", "Bogota", "Perth",
             "Montreal", "Porto", "Krakow", "Osaka", "Glasgow", "Valencia", "Tunis", "Quito", "Bergen", "Austin"),
    "country": ("Portugal", "Norway", "Kenya", "Japan", "Canada", "Peru", "Ireland", "Korea", "Egypt", "Chile",
                "Austria", "Vietnam", "Spain", "Finland", "Ghana", "Iceland", "Mexico", "India", "Italy", "Brazil"),
    "weather": ("sunny", "cloudy", "windy", "rainy", "foggy", "mild", "humid", "cold", "warm", "stormy", "clear"),
    "season": ("spring", "summer", "autumn", "winter"),
    "day": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "number": ("two", "three", "four", "five", "six", "seven", "eight", "ten", "twelve", "twenty"),
    "digits": ("12", "25", "40", "64", "150", "250", "800", "1,200", "3.5", "7.2"),
    "degrees": tuple(str(n) for n in range(-5, 36, 3)),
    "time": tuple(f"{h}:{m:02d}" for h in (6, 7, 8, 9, 11, 13, 15, 17, 19, 21) for m in (0, 15, 30, 45)),
    "year": tuple(str(y) for y in range(1850, 2025, 9)),
    "percent": tuple(f"{n} percent" for n in (3, 5, 8, 12, 15, 20, 25, 30, 40, 60)),
    "price": ("1.20", "2.50", "3.80", "4.95", "6.40", "9.99", "12.00", "15.50"),
    "amount": ("1/2 cup of", "2 tablespoons of", "1 teaspoon of", "200 grams of", "3 cups of", "a pinch of"),
    "acronym": ("NASA", "the UN", "the EU", "UNESCO", "the BBC", "the WHO", "MIT", "CERN"),
    "food": ("bread", "soup", "rice", "pasta", "salad", "stew", "pancakes", "curry", "noodles", "pie", "omelette",
             "dumplings", "roasted vegetables", "lentil soup", "fish cakes", "apple cake", "risotto", "tacos"),
    "ingredient": ("garlic", "onions", "butter", "olive oil", "tomatoes", "carrots", "lemon juice", "fresh herbs",
                   "black pepper", "flour", "honey", "cheese", "mushrooms", "potatoes", "ginger", "beans", "milk",
                   "eggs", "sugar", "spinach", "yogurt", "chickpeas"),
    "verb_cook": ("chop", "stir", "bake", "simmer", "roast", "fry", "mix", "boil", "grill", "season", "whisk"),
    "place": ("the old market", "the harbour", "the main square", "the river bank", "the city museum",
              "the botanical garden", "the train station", "the public library", "the cathedral", "the hills"),
    "transport": ("train", "bus", "ferry", "bicycle", "car", "plane", "tram", "night train"),
    "animal": ("fox", "owl", "deer", "heron", "rabbit", "otter", "hawk", "badger", "salmon", "bee", "whale",
               "beaver", "swallow", "turtle", "wolf", "butterfly", "frog", "seal", "crane", "lynx"),
    "habitat": ("forest", "wetland", "meadow", "mountain valley", "coastline", "desert", "river delta", "reef"),
    "planet": ("Mercury", "Venus", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"),
    "scientist": ("researchers", "astronomers", "chemists", "biologists", "engineers", "geologists", "students"),
    "material": ("water", "iron", "glass", "copper", "salt", "sand", "ice", "air", "wood", "silver", "carbon"),
    "sport": ("football", "tennis", "basketball", "cycling", "swimming", "rowing", "cricket", "volleyball",
              "running", "hockey"),
    "team": ("the home team", "the visitors", "the young squad", "the local club", "the national side"),
    "result": ("2-1", "3-0", "1-1", "4-2", "0-1", "2-2"),
    "adjective": ("quiet", "busy", "beautiful", "famous", "small", "large", "modern", "ancient", "friendly",
                  "colourful", "popular", "peaceful", "crowded", "elegant", "narrow", "remarkable"),
    "activity": ("visit the museums", "walk along the river", "try the local food", "watch the sunset",
                 "climb the hills", "take photographs", "browse the bookshops", "listen to street music"),
    "era": ("the twelfth century", "the Middle Ages", "the Renaissance", "the eighteenth century",
            "the industrial revolution", "the nineteenth century", "ancient times", "the last century"),
    "artist": ("painter", "composer", "poet", "architect", "sculptor", "novelist", "photographer", "dancer"),
    "artwork": ("a portrait", "a symphony", "a long poem", "a bridge", "a bronze statue", "a novel",
                "a series of landscapes", "an opera", "a mural", "a small chapel"),
    "object": ("laptop", "phone", "printer", "camera", "radio", "kettle", "washing machine", "calculator",
               "microscope", "satellite", "robot", "solar panel"),
    "job": ("teacher", "engineer", "baker", "farmer", "librarian", "pilot", "carpenter", "journalist",
            "gardener", "electrician", "shopkeeper", "programmer", "nurse", "pharmacist"),
    "subject": ("mathematics", "history", "geography", "music", "chemistry", "literature", "physics",
                "languages", "economics", "biology"),
    "product": ("apples", "fresh fish", "wool sweaters", "handmade pottery", "second hand books", "spices",
                "olives", "flowers", "cheese", "leather shoes", "honey", "wooden toys"),
    "feeling": ("tired", "hungry", "thirsty", "relaxed", "cheerful", "sleepy", "nervous", "proud"),
    "remedy": ("rest", "warm tea", "plenty of fluids", "a short walk", "fresh air", "a good night of sleep"),
    "habit": ("walking every day", "drinking enough water", "sleeping eight hours", "eating fresh fruit",
              "stretching in the morning", "taking short breaks", "cycling to work", "cooking at home"),
    "organ": ("heart", "lungs", "liver", "kidneys", "stomach", "brain", "skin", "bones", "muscles", "thyroid",
              "blood vessels", "spine", "joints", "eyes"),
    "illness": ("high blood pressure", "diabetes", "asthma", "migraine", "arthritis", "pneumonia", "anemia",
                "eczema", "the flu", "a common cold", "heart disease", "kidney stones", "allergies", "insomnia",
                "bronchitis", "thyroid disease", "osteoporosis", "heartburn"),
    "symptom": ("fever", "a cough", "headache", "tiredness", "chest pain", "a sore throat", "dizziness", "nausea",
                "shortness of breath", "joint pain", "a runny nose", "itchy skin", "stomach ache", "swelling"),
    "medicine": ("aspirin", "ibuprofen", "paracetamol", "insulin", "penicillin", "antibiotics", "vitamin D",
                 "antihistamines", "inhalers", "statins"),
    "check": ("a blood test", "an x-ray", "an MRI scan", "an ultrasound", "a CT scan", "an ECG", "a urine test"),
    "clinician": ("doctor", "nurse", "pharmacist", "surgeon", "dentist", "physiotherapist", "midwife"),
}


def _medical_fills() -> dict[str, tuple[str, ...]]:
    # An encyclopedia names the drugs, diseases and tests that notes use, so the tokenizer and the
    # base model know those words; what stays new is how notes are written.
    vocabularies = list(VOCABULARY.values())
    medications = [m for v in vocabularies for m in v.medications]
    # "metoprolol 25 mg twice daily" -> "metoprolol is usually taken as 25 mg twice daily"
    facts = [re.sub(r" (?=\d)", " is usually taken as ", m, count=1) for m in medications if re.search(r" \d", m)]
    return {
        "condition": tuple(c for v in vocabularies for c in v.conditions),
        "complaint": tuple(c for v in vocabularies for c in v.complaints),
        "test": tuple(t for v in vocabularies for t in v.tests),
        "procedure": tuple(p for v in vocabularies for p in v.procedures),
        "med_fact": tuple(facts),
        "medname": tuple(dict.fromkeys(re.split(r" \d", m)[0] for m in medications if re.search(r" \d", m))),
    }


_FILLS.update(_medical_fills())

_TOPICS: dict[str, tuple[str, ...]] = {
    "weather": (
        "The weather in {city} was {weather} on {day}, with a high of {degrees} degrees.",
        "Forecasters expect {weather} skies over {country} for the next {number} days.",
        "In {season}, {city} is often {weather} in the morning and {weather2} by the evening.",
        "A {weather} {season} is common in the north of {country}.",
        "People in {city} carried umbrellas because the sky looked {weather}.",
        "By {time} the wind picked up, and the temperature fell to {degrees} degrees.",
        "Farmers in {country} watch the weather closely during {season}.",
    ),
    "cities": (
        "{city} is a {adjective} city in {country}, known for {place}.",
        "Visitors to {city} often {activity} and spend an afternoon near {place}.",
        "The streets around {place} are {adjective} on {day} mornings.",
        "About {digits} thousand people lived in {city} in {year}.",
        "The city council of {city} opened a new park close to {place}.",
        "Old buildings near {place} remind visitors of the long history of {city}.",
        "Many people in {city} travel to work by {transport}.",
        "Opening hours of {place}: {time} to {time2}, every day except {day}.",
    ),
    "cooking": (
        "To make {food}, {verb_cook} the {ingredient} and add {amount} {ingredient2}.",
        "A good {food} needs {ingredient}, {ingredient2} and some patience.",
        "{verb_cook_cap} the mixture for {number} minutes and then serve it warm.",
        "My grandmother always made {food} with {ingredient} on {day}.",
        "In {country}, people often eat {food} in {season}.",
        "If the {food} is too dry, add more {ingredient} and {verb_cook} it again.",
        "Bake at 180 degrees for {digits} minutes, or until the top is golden.",
        "You will need:\n- {amount} {ingredient}\n- {amount2} {ingredient2}\n- {amount3} {ingredient3}",
    ),
    "travel": (
        "We took the {transport} from {city} to {city2}, and the journey lasted {number} hours.",
        "The best time to visit {country} is in {season}, when the weather is {weather}.",
        "Travellers in {country} like to {activity} before they move on.",
        "Our hotel in {city} was {adjective} and close to {place}.",
        "The {transport} leaves {city} at {time} and arrives in {city2} at {time2}.",
        "A return ticket costs {price} euros, and children under {number} travel free.",
        "Tickets for the {transport} were cheap, and the view of the {habitat} was {adjective}.",
    ),
    "science": (
        "{scientist_cap} measured how {material} changes when it is heated.",
        "The planet {planet} is visible in the night sky during {season}.",
        "Light travels much faster than sound, which is why we see lightning before we hear thunder.",
        "{scientist_cap} in {country} published a study about {material} and {material2} in {year}.",
        "When {material} cools down, its atoms move more slowly.",
        "In {year}, {acronym} shared new pictures of {planet} taken by a space telescope.",
        "{scientist_cap} use careful measurements and repeat each experiment {number} times.",
        "Water boils at 100 degrees Celsius at sea level and freezes at 0 degrees.",
    ),
    "sports": (
        "{team_cap} won the {sport} match {result} on {day}.",
        "The {sport} season in {country} starts in {season}.",
        "Fans in {city} cheered as {team} scored late in the game.",
        "Training for {sport} takes {number} hours a week for most young players.",
        "The coach said {team} played a {adjective} game despite the {weather} weather.",
        "{sport_cap} is one of the most popular sports in {country}.",
        "The final starts at {time}, and about {digits} thousand fans are expected in {city}.",
    ),
    "nature": (
        "A {animal} was seen near the {habitat} outside {city}.",
        "The {habitat} is home to the {animal} and many kinds of birds.",
        "In {season}, the {animal} looks for food along the {habitat}.",
        "Volunteers in {country} planted {number} thousand trees to protect the {habitat}.",
        "The {animal} is {adjective} and rarely seen during the day.",
        "Since {year}, sightings of the {animal} in the {habitat} have grown by {percent}.",
    ),
    "history": (
        "In {era}, {city} was a small town with {adjective} streets.",
        "A {artist} from {country} created {artwork} in {era}.",
        "The museum in {city} shows {artwork} by a {adjective} {artist}.",
        "Historians believe that {place} in {city} dates from {era}.",
        "During {era}, traders carried {product} from {country} to {country2}.",
        "The {artist} was born in {city} in {year} and worked there for {number} decades.",
    ),
    "work": (
        "The {job} in {city} starts work at {time} in the morning.",
        "A {job} needs patience, skill and a good {object}.",
        "Students in {country} study {subject} and {subject2} at school.",
        "Our teacher explained {subject} with a {object} and a few simple drawings.",
        "The new {object} saves the {job} {number} hours every week.",
        "Engineers in {city} designed a {object} that uses {percent} less energy.",
        "After years of training, she became a {job} in {city}.",
    ),
    "markets": (
        "On {day}, the market in {city} sells {product} and {product2}.",
        "The price of {product} rose by {percent} in {season} because of the {weather} weather.",
        "A shopkeeper near {place} has sold {product} for {number} years.",
        "A kilo of {product} costs {price} euros at the stall near {place}.",
        "The market opens at {time}, and the best {product} are gone before noon.",
        "Farmers bring {product} to {city} by {transport} every {day}.",
    ),
    "health": (
        "{illness_cap} is a common condition that affects the {organ}.",
        "Symptoms of {illness} can include {symptom} and {symptom2}.",
        "A {clinician} may use {check} to look at the {organ}.",
        "{medicine_cap} is often used to treat {illness}, but it is not right for everyone.",
        "About {percent} of adults in {country} live with {illness}.",
        "People with {illness} should talk to a {clinician} before taking {medicine}.",
        "Regular exercise keeps the {organ} and the {organ2} strong.",
        "Doctors say that {habit} is good for the {organ}.",
        "When people feel {feeling} after work, {remedy} often helps.",
        "A mild cold usually passes in a week with {remedy} and {remedy2}.",
        "Blood pressure is written as two numbers, for example 120/80, and a resting pulse is often 60 to 100.",
    ),
    "medicine": (
        "{condition_cap} is a condition that a {clinician} sees often; it may cause {complaint}.",
        "For adults, {med_fact}, but the right dose depends on the patient.",
        "People who notice {complaint} that gets worse over a few days should see a {clinician}.",
        "{test_cap} is a test that many hospitals in {country} offer, and the results take {number} days.",
        "{procedure_cap} is usually planned a few weeks ahead, and most patients go home the same day.",
        "In {year}, researchers in {city} compared two treatments for {condition}.",
        "Twice as many people were treated for {condition} in {year2} as in {year}.",
        "{medname_cap} and {medname2} are among the medicines that every pharmacy in {city} keeps in stock.",
        "A recent study showed that {medname} helps many people with {condition}.",
        "Doctors in the emergency department see {complaint} and {complaint2} every day.",
        "A woman of {digits} and a man of {number} years old were treated for {condition} last month.",
        "The {clinician} discussed treatment options, and the patient decided to continue with {medname}.",
    ),
    "everyday": (
        "{number_cap} months ago, the council discussed a plan to improve {place} in {city}.",
        "The club will continue training and start the new season in {season}.",
        "Please schedule a visit in advance, because {place} is closed on {day}.",
        "The weather was stable for a week, but it is likely to change by {day}.",
        "A recent survey showed that the situation in {city} is improving, although some streets are worse.",
        "Previously, the {job} worked at night, but now the current job starts at {time}.",
        "Return the books to {place} before {day}, or order them again online.",
        "Her diagnosis of the problem was simple: the {object} needed a new battery.",
        "The results were unremarkable, so the {job} went home and had {food} for dinner.",
        "Noise in {city} is controlled by rules, and loud music is not allowed after {time}.",
        "The river is intermittent; in {season} it often dries up for weeks.",
    ),
}
_TOPIC_NAMES = tuple(_TOPICS)
_FORMATTER = string.Formatter()


def _sentence(template: str, rng: random.Random) -> str:
    # Slot "ingredient2" draws from "ingredient" again; "sport_cap" is "sport" capitalised.
    values: dict[str, str] = {}
    for _, name, _, _ in _FORMATTER.parse(template):
        if name is None or name in values:
            continue
        base = name.removesuffix("_cap").rstrip("0123456789")
        word = rng.choice(_FILLS[base])
        values[name] = word[0].upper() + word[1:] if name.endswith("_cap") else word
    return template.format(**values)


def general_corpus(seed: int = 0) -> list[str]:
    """Return ``NUM_DOCUMENTS`` general-domain documents (about 0.6 MB in all).

    Each document stays on one topic for four to eight sentences. Same seed,
    same documents, in every process.
    """
    rng = random.Random(f"general-corpus/{seed}")
    documents = []
    for _ in range(NUM_DOCUMENTS):
        templates = _TOPICS[rng.choice(_TOPIC_NAMES)]
        count = rng.randint(4, 8)
        documents.append(" ".join(_sentence(rng.choice(templates), rng) for _ in range(count)))
    return documents
