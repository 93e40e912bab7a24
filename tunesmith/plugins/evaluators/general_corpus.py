"""A small general-English held-out corpus for the forgetting check.

Written for tunesmith (no third-party text): everyday facts, science, history,
instructions and conversation, so a fine-tune's cost on general language shows
up as a rise in perplexity. Give the forgetting evaluator a ``path`` to use a
larger corpus of your own.
"""

PASSAGES: tuple[str, ...] = (
    "Water boils at one hundred degrees Celsius at sea level. At higher altitudes the air pressure is lower, so water boils at a lower temperature and food takes longer to cook.",
    "The heart pumps blood through the body. Arteries carry blood away from the heart, and veins bring it back. A resting adult heart beats about sixty to one hundred times a minute.",
    "To make a cup of tea, boil fresh water, pour it over the tea leaves or a tea bag, and let it steep for three to five minutes. Remove the leaves and add milk or lemon if you like.",
    "The Moon orbits the Earth roughly once every twenty-seven days. Because the same side always faces us, people on Earth never see the far side of the Moon without a spacecraft.",
    "Plants take in carbon dioxide from the air and water from the soil. Using the energy of sunlight, they turn these into sugar and release oxygen. This process is called photosynthesis.",
    "A good night's sleep helps memory and mood. Most adults need between seven and nine hours. Keeping a regular schedule and avoiding screens before bed can make it easier to fall asleep.",
    "The printing press, developed in Europe in the fifteenth century, made books far cheaper to produce. Ideas spread faster, and more people learned to read.",
    "A triangle has three sides and three angles, and its angles always add up to one hundred and eighty degrees. A right triangle has one angle of ninety degrees.",
    "When you send an e-mail, your message is split into small packets that travel across many computers before they are put back together on the other side.",
    "Bees collect nectar from flowers and turn it into honey. While they move from flower to flower, they carry pollen, which helps many plants produce fruit and seeds.",
    "Rivers usually begin in hills or mountains, where rain and melting snow gather into streams. The streams join together and flow downhill until they reach a lake or the sea.",
    "Exercise strengthens the muscles and the heart. Even a brisk walk of thirty minutes on most days of the week lowers the risk of many common illnesses.",
    "The library opens at nine in the morning and closes at six in the evening. Books can be borrowed for three weeks and renewed online if nobody else has reserved them.",
    "Sound travels as a wave through air, water and solid materials. It moves faster through water than through air, and faster still through steel.",
    "A healthy breakfast might include fruit, whole grains and some protein, such as eggs or yogurt. Eating in the morning gives the body energy for the hours ahead.",
    "The first successful powered aeroplane flight took place in 1903. It lasted only twelve seconds, but within a few decades aircraft were crossing oceans.",
    "If you are lost in a city, look for a street sign or a landmark, check a map, or ask someone at a shop for directions. Most people are happy to help.",
    "Volcanoes form where molten rock from deep inside the Earth rises to the surface. Some erupt violently, while others release slow rivers of lava.",
    "Saving a small amount of money every month adds up over time. Many people set aside part of their income as soon as they are paid, before spending on anything else.",
    "Light from the Sun takes about eight minutes to reach the Earth. The light we see from distant stars left them many years ago, so we see them as they were in the past.",
    "Children learn language by listening and copying. By the age of three, most can speak in short sentences and understand far more words than they can say.",
    "A recipe for pancakes needs flour, eggs, milk and a pinch of salt. Whisk them into a smooth batter, heat a pan with a little butter, and cook each side until golden.",
    "Snow forms when water vapour in clouds freezes into ice crystals. Each crystal grows into a six-sided shape, and no two snowflakes are exactly alike.",
    "Before crossing the road, stop at the kerb, look both ways and listen for traffic. Cross only when the road is clear, and keep looking while you walk.",
)
