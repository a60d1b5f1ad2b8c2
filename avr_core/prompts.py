"""Every prompt text and marker of the method, in one place, word for word.

Source: the authors' release, github.com/Banner-Z/AvR (commit a3883a1).
The texts are part of the method -- do not "fix" their typos ("You evaluation",
"the the", "Okey", the curly apostrophe): results and released data must stay comparable.

- `JUDGE_SAMPLING`, `REFINE_SAMPLING`: src/actions.py, `individual_judge` /
  `individual_refine`, template "v2" (the conversational template the paper's main
  experiment uses: the instruction is appended as a user turn, with "below" -> "above").
  The judge is MT-Bench's single-answer grading prompt.
- `JUDGE_TRAIN`, `REFINE_TRAIN`: src/data/prepare_dpo_data.py and prepare_sft_data.py
  (the texts placed into the RSFT conversations and preference pairs a model is trained on,
  and therefore the texts a trained model is prompted with at inference).
- Thought markers: src/data/prepare_cot_sft_data_greedy.py (DESIGN.md step 8).
"""

_MT_BENCH_JUDGE = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. Your evaluation should consider factors such as "
    "the helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. "
    "{your} evaluation should focus on the assistant's answer to the last user question. Begin your "
    "evaluation by providing a short explanation. Be as objective as possible. After providing your "
    "explanation, you must rate the response at the end of your answer on a scale of 1 to 10 by "
    "strictly following this format: \"[[rating]]\", for example: \"Rating: [[5]]\".\n\n"
)

# actions.individual_judge (v2): SYSTEM_PROMPT.replace("below", "above"); note "You evaluation".
JUDGE_SAMPLING = _MT_BENCH_JUDGE.format(your="You").replace("below", "above")

# actions.individual_refine (v2): SYSTEM_PROMPT.replace("below", "above").
REFINE_SAMPLING = (
    "Please revise the AI assistant's response based on the evaluation provided below, addressing any "
    "shortcomings mentioned in the review. Your revision should focus solely on improving the "
    "assistant's answer to the last user question. Provide the revised response directly, without "
    "any additional commentary.\n\n"
).replace("below", "above")

# data/prepare_dpo_data.py JUDGE_PROMPT (identical to the sampling judge).
JUDGE_TRAIN = _MT_BENCH_JUDGE.format(your="You").replace("below", "above")

# data/prepare_dpo_data.py / prepare_sft_data.py CORRECT_PROMPT; note "the the".
REFINE_TRAIN = (
    "Please revise the AI assistant's response based on the evaluation provided above, addressing any "
    "shortcomings mentioned in the review. Your revision should focus solely on improving the the "
    "assistant's answer to the last user question. Provide the revised response directly, without "
    "any additional commentary.\n\n"
)

# What `force_rating` appends to a critique that has no parsable rating (DESIGN.md step 2).
FORCED_RATING_PREFIX = "\n\nRating: [["

# Long refinement thought markers (DESIGN.md step 8), exact.
THOUGHT_START = "<|Start of recursive criticism and improvement|>"
THOUGHT_ANSWER = "## Let's answer the question first:"
THOUGHT_CRITICIZE = "## Now, let's try to criticize this answer:"
THOUGHT_IMPROVE = "## Okey, let's improve the above answer based on the criticism:"
THOUGHT_ALMOST_DONE = "## Okay, now it\u2019s almost done."
THOUGHT_END = "<|End of recursive criticism and improvement|>"
FINAL_ANSWER = "Final answer:"


def judge_conversation(prompt: list[dict], answer: str, judge: str = JUDGE_SAMPLING) -> list[dict]:
    """[x, y0, JUDGE]: what a critique is sampled from.

    >>> judge_conversation([{"role": "user", "content": "2+2?"}], "5")[-1]["role"]
    'user'
    """
    return [*prompt, {"role": "assistant", "content": answer}, {"role": "user", "content": judge}]


def refine_conversation(prompt: list[dict], answer: str, critique: str,
                        judge: str = JUDGE_SAMPLING, refine: str = REFINE_SAMPLING) -> list[dict]:
    """[x, y0, JUDGE, c, REFINE]: what a refinement is sampled from."""
    return [*judge_conversation(prompt, answer, judge),
            {"role": "assistant", "content": critique}, {"role": "user", "content": refine}]
