"""guess.py: guess the secret number from 1 to 100 (an lmforge environment: JSON lines in, one
JSON line out per line in)."""
import json
import random
import sys

secrets = {}
for line in sys.stdin:
    message = json.loads(line)
    episode = message["episode"]
    if message["type"] == "reset":
        # the row decides the game: the episodes of one group all play the same one
        secrets[episode] = random.Random(message["row"]["lmforge_row"]).randint(1, 100)
        answer = {"episode": episode, "observation": "I am thinking of a number from 1 to 100. Guess it."}
    elif message["type"] == "step":
        numbers = [int(w) for w in message["content"].split() if w.isdigit()]
        secret = secrets[episode]
        if not numbers:
            answer = {"episode": episode, "observation": "Say a number.", "reward": -0.1}
        elif numbers[-1] == secret:
            answer = {"episode": episode, "reward": 1, "done": True}
        else:
            answer = {"episode": episode, "observation": "Higher." if numbers[-1] < secret else "Lower."}
    else:  # "end": the episode is over
        secrets.pop(episode, None)
        answer = {"episode": episode}
    print(json.dumps(answer), flush=True)
