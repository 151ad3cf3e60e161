"""The embedded default dataset: a seeded "knowledge world" of fictional people.

Each person has a first and a last name no one else has (up to 250 people) and a few attributes
(birth date, birth city, university, field of study, employer). From them we write:
- biographies for pretraining, several per person, each with a random paraphrase of every fact
  and the sentences in random order (the augmentation that Allen-Zhu & Li, "Physics of Language
  Models: Part 3.1", show lets knowledge be extracted by question answering later);
- question/answer pairs for every attribute ("What is the birth city of NAME?" → "CITY").

People are split three ways: fine-tuning people (their QA pairs are the fine-tuning set),
validation people (their QA picks the best fine-tuning step) and held-out people (never seen in
fine-tuning; their accuracy tells whether pretraining knowledge can be extracted). Biographies cover
everyone. With `mixed_training`, the fine-tuning people's QA pairs also go into the pretraining text
as plain "Question: ... Answer: ..." documents (not the chat template used in fine-tuning),
`mixed_training_copies` times each: their share of the pretraining text.

Everything is a pure function of the parameters and the seed: no network, no clock.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from llmpipe.config.layout import QA_SPLITS
from llmpipe.config.params import setting
from llmpipe.errors import SettingError

FIRST_NAMES = [
    "Amara", "Bastian", "Celeste", "Dorian", "Elowen", "Fabian", "Greta", "Hamish", "Ilse",
    "Jasper", "Kalinda", "Leander", "Marisol", "Niall", "Odalys", "Percival", "Quilla", "Rosalind",
    "Soren", "Tamsin", "Ulric", "Vesna", "Wendell", "Xiomara", "Yannick", "Zuzana", "Anselm",
    "Brielle", "Cassius", "Delphine", "Emrys", "Faustine", "Gideon", "Honora", "Ignatius",
    "Juniper", "Kasimir", "Lisette", "Magnus", "Noemi", "Osric", "Philippa", "Ravi", "Sabine",
    "Thaddeus", "Una", "Viggo", "Wilhelmina", "Ximena", "Yorick", "Zephyrine", "Aurelio", "Blythe",
    "Cormac", "Daphne", "Evander", "Fenella", "Gwendolyn", "Horatio", "Isolde", "Abelard",
    "Adrienne", "Agatha", "Alaric", "Alistair", "Amadeus", "Ambrose", "Anastasia", "Annika",
    "Apollonia", "Araminta", "Arlo", "Astrid", "Augustin", "Aurora", "Barnaby", "Beatrix",
    "Benedikt", "Bertrand", "Bianca", "Bjorn", "Bronwyn", "Caius", "Calliope", "Camille", "Casimir",
    "Cedric", "Cressida", "Cyprian", "Dagny", "Damaris", "Desmond", "Dietrich", "Dimitri",
    "Dorothea", "Drusilla", "Eamon", "Edmund", "Eleanora", "Elias", "Eloise", "Engelbert",
    "Ephraim", "Esmeralda", "Estelle", "Eugenie", "Everett", "Ezekiel", "Felicity", "Ferdinand",
    "Fiorella", "Florian", "Francesca", "Frederica", "Gaspard", "Genevieve", "Georgina", "Gilbert",
    "Giselle", "Godfrey", "Griselda", "Gustav", "Hadrian", "Harriet", "Hector", "Henrietta",
    "Hildegard", "Hugo", "Imogen", "Ingeborg", "Isadora", "Ivo", "Jacinta", "Jeremiah", "Joaquin",
    "Jolyon", "Josephine", "Julius", "Justine", "Kaspar", "Katarina", "Kieran", "Konstantin",
    "Lavinia", "Leopold", "Lorcan", "Lucius", "Ludmila", "Lysander", "Mafalda", "Malachi",
    "Marcellus", "Margarethe", "Matthias", "Maximilian", "Melisande", "Mirabel", "Montague",
    "Morwenna", "Nathaniel", "Nerissa", "Nikolai", "Ottilie", "Octavia", "Oleander", "Orlando",
    "Ottoline", "Pascal", "Perpetua", "Peregrine", "Petronella", "Phineas", "Priscilla", "Quentin",
    "Quinton", "Radomir", "Raphael", "Rebekah", "Reinhold", "Rodrigo", "Rosamund", "Rupert",
    "Sebastian", "Seraphina", "Severin", "Sigrid", "Silvester", "Solveig", "Stellan", "Sybilla",
    "Tancred", "Temperance", "Theodora", "Tobias", "Tristan", "Ursula", "Valentina", "Valerian",
    "Venetia", "Victorine", "Vincenzo", "Violetta", "Waldemar", "Wilfred", "Winifred", "Xavier",
    "Yolanda", "Zachariah", "Zenobia", "Adalbert", "Aeneas", "Albertine", "Alphonse", "Anneliese",
    "Archer", "Ariadne", "Barnabas", "Benedetta", "Berenice", "Caspian", "Celestine", "Clementine",
    "Constance", "Cosimo", "Cornelius", "Desdemona", "Dominika", "Edwina", "Elspeth", "Emmeline",
    "Erasmus", "Esther", "Fabiola", "Fergus", "Fidelma", "Gawain", "Gertrude", "Gregor",
    "Hortensia", "Humphrey", "Isidore", "Jessamine", "Jocasta", "Leocadia", "Leontine", "Lucasta",
    "Mathilde", "Meredith", "Mordecai", "Narcissa", "Odile", "Olivier", "Osvaldo", "Pelagia",
    "Perdita",
]
LAST_NAMES = [
    "Abernathy", "Blackwood", "Castellano", "Drummond", "Eberhardt", "Fairweather", "Galloway",
    "Hargreaves", "Ingram", "Jablonski", "Kowalczyk", "Lindqvist", "Montgomery", "Nakamura",
    "Okonkwo", "Pemberton", "Quintero", "Rasmussen", "Sinclair", "Thornbury", "Underhill",
    "Valentini", "Whitcombe", "Xanthopoulos", "Yardley", "Zimmerman", "Ashcroft", "Bellamy",
    "Carmichael", "Delacroix", "Ellsworth", "Fitzgerald", "Grimaldi", "Holloway", "Iverson",
    "Jovanovic", "Kingsley", "Lockhart", "Mercado", "Northcott", "Oyelaran", "Prescott",
    "Ravenscroft", "Saltonstall", "Tremaine", "Vasquez", "Wexley", "Yoshida", "Zeller",
    "Brightwater", "Achterberg", "Adeyemi", "Albrecht", "Alvarado", "Amundsen", "Andersson",
    "Arbuthnot", "Archibald", "Arrington", "Atherton", "Babington", "Bachmann", "Baranski",
    "Barrowclough", "Battaglia", "Beauchamp", "Bergstrom", "Birkenhead", "Bjornsson", "Blanchard",
    "Bonaventura", "Bosworth", "Brannigan", "Brocklehurst", "Bustamante", "Cadwallader", "Calderon",
    "Callahan", "Cardenas", "Castleton", "Chadwick", "Chatterjee", "Chudzik", "Cioffi",
    "Claybourne", "Colquhoun", "Cornwallis", "Cranston", "Crowther", "Dalgleish", "Darrowby",
    "Davenport", "Dellinger", "Desrosiers", "Dimitrov", "Donnelly", "Dubois", "Dunleavy",
    "Eastwood", "Edelstein", "Egerton", "Eriksen", "Escobar", "Esterhazy", "Etherington",
    "Falconer", "Farnsworth", "Featherstone", "Ferreira", "Finnegan", "Fontaine", "Fothergill",
    "Fraser", "Fujimoto", "Gallagher", "Garibaldi", "Gathercole", "Gillespie", "Goldberg",
    "Gonzaga", "Gottlieb", "Greenhalgh", "Grosvenor", "Gunnarsson", "Haddington", "Halvorsen",
    "Harcourt", "Hathaway", "Heathcote", "Hendricks", "Herrera", "Hightower", "Hofstadter",
    "Huxley", "Ibarra", "Iglesias", "Ishikawa", "Jaramillo", "Jefferies", "Jorgensen", "Kaminski",
    "Karlsson", "Kavanagh", "Kensington", "Kilbride", "Kirkpatrick", "Kobayashi", "Kuznetsov",
    "Lachance", "Lafferty", "Langford", "Latimer", "Lefebvre", "Lennox", "Llewellyn", "Lombardi",
    "Loughran", "Macallister", "Mackintosh", "Madrigal", "Malinowski", "Mansfield", "Marchetti",
    "Matsumoto", "Medina", "Merriweather", "Moncrieff", "Morrissey", "Mortimer", "Mulligan",
    "Nakashima", "Navarro", "Nettleton", "Nielsen", "Norbury", "Oakes", "Ogilvie", "Olafsson",
    "Ormsby", "Ortega", "Osborne", "Pacheco", "Pappas", "Pendleton", "Petrovic", "Pickering",
    "Quarrington", "Radcliffe", "Ramirez", "Redfern", "Rochester", "Romanov", "Rothschild",
    "Rutherford", "Sandoval", "Santangelo", "Scarborough", "Schellenberg", "Selwyn", "Shackleton",
    "Sheridan", "Sokolov", "Spellman", "Stanhope", "Steinberg", "Stroud", "Sutherland", "Takahashi",
    "Tallis", "Tennyson", "Thackeray", "Tolliver", "Townsend", "Trevelyan", "Tschirner", "Uchida",
    "Ulbricht", "Urquhart", "Vandenberg", "Vanterpool", "Varga", "Villanueva", "Vogelsang",
    "Wadsworth", "Wainwright", "Waterhouse", "Weatherby", "Wellesley", "Westergaard", "Whitmore",
    "Wilberforce", "Winterbottom", "Wojcik", "Woodhouse", "Wrexham", "Yamamoto", "Yilmaz",
    "Youngblood", "Zabinski", "Zamora", "Zapata", "Zelenko", "Zielinski", "Zorrilla", "Zubiri",
    "Abercrombie", "Bancroft", "Dunbar", "Everhart", "Fairbanks",
]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
VALUES = {
    "birth_city": [
        "Lisbon", "Oslo", "Kyoto", "Nairobi", "Lima", "Hanoi", "Dublin", "Tbilisi", "Quito", "Perth",
        "Krakow", "Seville", "Montreal", "Auckland", "Valparaiso", "Marrakesh", "Bergen", "Tallinn",
        "Cordoba", "Adelaide",
    ],
    "university": [
        "Ashford University", "Kellerman Institute", "Northvale College", "Riverton University",
        "Saint Aldric College", "Brennmoor University", "Eastlake Polytechnic", "Harrowgate University",
        "Linwood Institute of Technology", "Marchbank University", "Oakridge College",
        "Pinecrest University", "Queensbury Institute", "Stonebridge University", "Thistledown College",
        "Westerly University", "Calloway Institute", "Dunmore University", "Fernhill College",
        "Glenrock University",
    ],
    "major": [
        "astronomy", "botany", "chemistry", "economics", "geology", "history", "linguistics",
        "mathematics", "philosophy", "physics", "psychology", "sociology", "statistics", "zoology",
        "architecture", "music theory", "oceanography", "anthropology", "civil engineering",
        "computer science",
    ],
    "employer": [
        "Halcyon Robotics", "Bluefin Logistics", "Cobalt Pharmaceuticals", "Driftwood Media",
        "Emberline Energy", "Foxglove Textiles", "Granite Peak Bank", "Horizon Aerospace",
        "Ironleaf Foods", "Juniper Software", "Kestrel Shipping", "Lumen Optics", "Mistral Airlines",
        "Northwind Insurance", "Orchid Biotech", "Pioneer Mining", "Quasar Telecom", "Redwood Publishing",
        "Silverline Railways", "Tidewater Chemicals",
    ],
}
ATTRIBUTES = ["birth_date", "birth_city", "university", "major", "employer"]

# Several paraphrases per fact; {name} is the full name, {value} the attribute value.
FACT_TEMPLATES = {
    "birth_date": [
        "{name} was born on {value}.",
        "{name} came into the world on {value}.",
        "The birthday of {name} is {value}.",
        "{name} celebrates a birthday on {value}.",
        "{name}'s date of birth is {value}.",
    ],
    "birth_city": [
        "{name} was born in {value}.",
        "{name} spent early years in {value}, the city of birth.",
        "The birthplace of {name} is {value}.",
        "{name} is a native of {value}.",
        "{name} originally comes from {value}.",
    ],
    "university": [
        "{name} studied at {value}.",
        "{name} graduated from {value}.",
        "{name} earned a degree at {value}.",
        "{name} attended {value}.",
        "{name} is an alumnus of {value}.",
    ],
    "major": [
        "{name} majored in {value}.",
        "{name}'s field of study was {value}.",
        "{name} chose {value} as a field of study.",
        "At university, {name} focused on {value}.",
        "{name} completed a degree in {value}.",
    ],
    "employer": [
        "{name} works for {value}.",
        "{name} is employed by {value}.",
        "{name} has a job at {value}.",
        "{name} earns a living at {value}.",
        "{name} is on the staff of {value}.",
    ],
}
QUESTION_TEMPLATES = {
    "birth_date": "What is the birth date of {name}?",
    "birth_city": "What is the birth city of {name}?",
    "university": "Which university did {name} attend?",
    "major": "What did {name} study?",
    "employer": "Which company does {name} work for?",
}
FINETUNED, VALIDATION, HELDOUT = QA_SPLITS  # the three groups of people


@dataclass(frozen=True)
class WorldConfig:
    num_people: int = setting(200, "people in the world (up to 250, no two share a first or a last name)", min=3)
    attributes: tuple[str, ...] = setting(tuple(ATTRIBUTES), "facts per person", choices=ATTRIBUTES,
                                          unique=True)
    paraphrases: int = setting(10, "pretraining biographies per person (paraphrased, shuffled)", min=1)
    validation_biography_fraction: float = setting(0.25, "share of people with one extra, unseen biography "
                                                         "(validation text)", above=0, max=1)
    finetune_fraction: float = setting(0.5, "share of people whose QA pairs are fine-tuned on", above=0, max=1)
    validation_fraction: float = setting(0.1, "share of people whose QA pairs pick the best fine-tuning step",
                                         above=0, max=1)
    mixed_training: bool = setting(True, "also put the fine-tuning people's QA in the pretraining text")
    mixed_training_copies: int = setting(1, "... this many times each (their share of the pretraining text)", min=1)
    seed: int = 0  # the pipeline's seed (not a key of this section)

    def __post_init__(self):
        if self.num_people > max_people():
            raise SettingError("num_people", f"expected at most {max_people()} (distinct first and last names), "
                                             f"got {self.num_people}")
        if self.finetune_fraction + self.validation_fraction >= 1:
            raise SettingError("finetune_fraction", "finetune_fraction + validation_fraction must be below 1, so "
                                                    "that some people are held out")


@dataclass
class Person:
    name: str
    attributes: dict[str, str]
    split: str


def max_people() -> int:
    return len(FIRST_NAMES) * len(LAST_NAMES)


def draw_names(count: int, rng: random.Random) -> list[str]:
    """`count` distinct full names at random, each first and each last name used as evenly as possible.

    Up to min(len(FIRST_NAMES), len(LAST_NAMES)) people, no two share a first or a last name. The small
    default model keys a person's facts on one name token; with shared name parts it then answers with a
    namesake's facts, and the seed decides whether it learns to tell namesakes apart (docs/seeds.md).
    """
    candidates = [(first, last) for first in FIRST_NAMES for last in LAST_NAMES]
    rng.shuffle(candidates)
    first_uses: dict[str, int] = dict.fromkeys(FIRST_NAMES, 0)
    last_uses: dict[str, int] = dict.fromkeys(LAST_NAMES, 0)
    chosen: dict[tuple[str, str], None] = {}
    most_uses = 0
    while len(chosen) < count:  # pass k takes the names whose parts are still used fewer than k times
        most_uses += 1
        for first, last in candidates:
            if len(chosen) == count:
                break
            if first_uses[first] < most_uses and last_uses[last] < most_uses and (first, last) not in chosen:
                chosen[first, last] = None
                first_uses[first] += 1
                last_uses[last] += 1
    return [f"{first} {last}" for first, last in chosen]


def make_people(config: WorldConfig) -> list[Person]:
    """Draw unique names and attribute values; assign each person to a split."""
    rng = random.Random(f"people-{config.seed}")
    names = draw_names(config.num_people, rng)
    n_finetune = round(config.num_people * config.finetune_fraction)
    n_validation = round(config.num_people * config.validation_fraction)
    people = []
    for index, name in enumerate(names):
        split = (FINETUNED if index < n_finetune
                 else VALIDATION if index < n_finetune + n_validation else HELDOUT)
        attributes = {}
        for attribute in config.attributes:
            if attribute == "birth_date":
                attributes[attribute] = (f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, "
                                         f"{rng.randint(1940, 2005)}")
            else:
                attributes[attribute] = rng.choice(VALUES[attribute])
        people.append(Person(name, attributes, split))
    return people


def biography(person: Person, rng: random.Random) -> str:
    sentences = [rng.choice(FACT_TEMPLATES[a]).format(name=person.name, value=v)
                 for a, v in person.attributes.items()]
    rng.shuffle(sentences)
    return " ".join(sentences)


def qa_pairs(person: Person) -> list[dict]:
    return [{"question": QUESTION_TEMPLATES[a].format(name=person.name), "answer": value,
             "person": person.name, "attribute": a, "split": person.split}
            for a, value in person.attributes.items()]


PLAIN_QA = "Question: {question} Answer: {answer}"  # one line of a mixed-training QA document


def plain_qa_document(person: Person) -> str:
    """QA in a plain form for mixed pretraining (deliberately not the fine-tuning chat template)."""
    return "\n".join(PLAIN_QA.format(question=qa["question"], answer=qa["answer"]) for qa in qa_pairs(person))


def build_world(config: WorldConfig) -> dict:
    """Everything the prepare stage writes for the embedded default, as plain Python objects."""
    people = make_people(config)
    rng = random.Random(f"text-{config.seed}")
    train_docs = [biography(p, rng) for p in people for _ in range(config.paraphrases)]
    if config.mixed_training:
        train_docs += [plain_qa_document(p) for p in people if p.split == FINETUNED
                       for _ in range(config.mixed_training_copies)]
    rng.shuffle(train_docs)
    with_validation = rng.sample(people, round(len(people) * config.validation_biography_fraction))
    validation_docs = [biography(p, rng) for p in with_validation]
    qa = {split: [pair for p in people if p.split == split for pair in qa_pairs(p)] for split in QA_SPLITS}
    return {
        "people": [{"name": p.name, "split": p.split, **p.attributes} for p in people],
        "pretrain_train": train_docs,
        "pretrain_validation": validation_docs,
        "qa": qa,
    }
