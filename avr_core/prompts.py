"""Every prompt text and marker of the method, in one place, word for word.

Source: the authors' release, github.com/Banner-Z/AvR (commit a3883a1).
The texts are part of the method -- do not "fix" their typos ("You evaluation",
"the the", "Okey", the curly apostrophe): results and released data must stay comparable.

Each of the authors' texts is held once, named by where it is used (docs/FIDELITY.md):

- `JUDGE_SAMPLING`: src/actions.py `individual_judge`, template "v2" (the conversational
  template of the paper's main experiment: the instruction is appended as a user turn,
  "below" -> "above"); MT-Bench's single-answer grading prompt, with "You evaluation".
- `JUDGE_REFINE_CONVERSATION`: src/actions.py `individual_refine` (v2): the judge turn INSIDE
  the refine conversation [x, y0, JUDGE, c, REFINE]. Its own copy of the text, which says
  "Your evaluation" (config `refine.conversation_judge: refine`; ours reuses `JUDGE_SAMPLING`,
  the text the critique was actually sampled from).
- `REFINE_SAMPLING`: src/actions.py `individual_refine` (v2) SYSTEM_PROMPT, "below" -> "above".
- `JUDGE_SFT_DATA`: src/data/prepare_sft_data.py JUDGE_PROMPT, the judge turn of the RSFT
  examples (no "consider factors ..." sentence; asks for "strengths and weaknesses").
  Config `select.rsft_judge: sft`; ours (`dpo`) uses `JUDGE_DPO_DATA` everywhere.
- `JUDGE_DPO_DATA`: src/data/prepare_dpo_data.py JUDGE_PROMPT (the same string as
  `JUDGE_SAMPLING`), the judge turn of the critique and refinement pairs.
- `REFINE_DATA`: CORRECT_PROMPT of both prepare_sft_data.py and prepare_dpo_data.py ("the the").
- `JUDGE_TRAIN` / `REFINE_TRAIN`: the names the rest of the code uses for the texts a model is
  trained on (and prompted with at inference): `JUDGE_DPO_DATA` / `REFINE_DATA`.
- Thought markers: src/data/prepare_cot_sft_data_greedy.py (docs/DESIGN.md step 8).
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

# actions.individual_refine (v2): its JUDGE_PROMPT.replace("below", "above"); "Your evaluation".
JUDGE_REFINE_CONVERSATION = _MT_BENCH_JUDGE.format(your="Your").replace("below", "above")

# actions.individual_refine (v2): SYSTEM_PROMPT.replace("below", "above").
REFINE_SAMPLING = (
    "Please revise the AI assistant's response based on the evaluation provided below, addressing any "
    "shortcomings mentioned in the review. Your revision should focus solely on improving the "
    "assistant's answer to the last user question. Provide the revised response directly, without "
    "any additional commentary.\n\n"
).replace("below", "above")

# data/prepare_sft_data.py JUDGE_PROMPT: the RSFT examples' judge turn in the release.
JUDGE_SFT_DATA = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed above. Your evaluation should focus on the assistant's "
    "answer to the last user question and give the strengths and weaknesses of that answer. Begin your "
    "evaluation by providing a short explanation. Be as objective as possible. After providing your "
    "explanation, you must rate the response at the end of your answer on a scale of 1 to 10 by "
    "strictly following this format: \"[[rating]]\", for example: \"Rating: [[5]]\".\n\n"
)

# data/prepare_dpo_data.py JUDGE_PROMPT: the same string as the sampling judge ("You evaluation").
JUDGE_DPO_DATA = JUDGE_SAMPLING

# data/prepare_dpo_data.py / prepare_sft_data.py CORRECT_PROMPT; note "the the".
REFINE_DATA = (
    "Please revise the AI assistant's response based on the evaluation provided above, addressing any "
    "shortcomings mentioned in the review. Your revision should focus solely on improving the the "
    "assistant's answer to the last user question. Provide the revised response directly, without "
    "any additional commentary.\n\n"
)

# The texts trained on (RSFT examples by default, every pair) and prompted with at inference.
JUDGE_TRAIN = JUDGE_DPO_DATA
REFINE_TRAIN = REFINE_DATA

# Config values -> texts (refine.conversation_judge, select.rsft_judge).
CONVERSATION_JUDGES = {"sampling": JUDGE_SAMPLING, "refine": JUDGE_REFINE_CONVERSATION}
RSFT_JUDGES = {"dpo": JUDGE_DPO_DATA, "sft": JUDGE_SFT_DATA}

# What `force_rating` appends to a critique that has no parsable rating (docs/DESIGN.md step 2).
FORCED_RATING_PREFIX = "\n\nRating: [["

# Long refinement thought markers (docs/DESIGN.md step 8), exact.
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
