"""BLEU and chrF from sacrebleu as an `evaluate` metric module that ships inside lmkit.

`evaluate.load("sacrebleu")` downloads its script from the Hugging Face Hub, which fails offline; this module is
loaded from the installed package instead (`evaluate.load(<path to this file>)`), so scoring never touches the
network. The scores are sacrebleu's own corpus BLEU and chrF (Post, 2018), on a 0-100 scale.
"""

import datasets
import evaluate
import sacrebleu

_DESCRIPTION = "Corpus BLEU and chrF (sacrebleu) of generated continuations against one reference each."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated texts.
    references (list of str): one reference text per prediction.
    tokenize (str): sacrebleu BLEU tokenizer: '13a' (default), 'zh' for Chinese, 'char', 'intl', 'none', ...
Returns:
    bleu (float), chrf (float): 0-100; bp, sys_len, ref_len: BLEU's brevity penalty and lengths.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class BleuChrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Post, 2018. A Call for Clarity in Reporting BLEU Scores.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            reference_urls=["https://github.com/mjpost/sacrebleu"],
        )

    def _compute(self, predictions, references, tokenize="13a"):
        bleu = sacrebleu.corpus_bleu(predictions, [references], tokenize=tokenize)
        chrf = sacrebleu.corpus_chrf(predictions, [references])
        return {
            "bleu": bleu.score,
            "chrf": chrf.score,
            "bp": bleu.bp,
            "sys_len": bleu.sys_len,
            "ref_len": bleu.ref_len,
        }
