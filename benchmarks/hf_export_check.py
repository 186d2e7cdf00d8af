"""Answer held-out samples with plain transformers (mmdist cannot be imported), compare with `mmdist eval`'s answers.

    mmdist demo --run-dir runs/demo-llava   # the demo chain (Linear heads, 2-layer projector) exports
    mmdist export --run runs/demo-llava --format hf --out runs/demo-llava-hf
    mmdist eval --run runs/demo-llava --data "runs/demo-llava/data/shards/eval/eval-{000000..000001}.tar" --match digit
    python -I benchmarks/hf_export_check.py runs/demo-llava-hf runs/demo-llava/data/shards/eval/eval-00000{0,1}.tar \
        runs/demo-llava/fuse/eval/answers.jsonl
"""
import importlib.abc
import io
import json
import sys
import tarfile


class NoMmdist(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "mmdist" or name.startswith("mmdist."):
            raise ImportError("must run without mmdist")


sys.meta_path.insert(0, NoMmdist())
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoProcessor, LlavaForConditionalGeneration  # noqa: E402

folder, shards, answers_jsonl = sys.argv[1], sys.argv[2:-1], sys.argv[-1]
model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
processor = AutoProcessor.from_pretrained(folder, backend="pil")
ours = {json.loads(line)["key"]: json.loads(line) for line in open(answers_jsonl)}
same = correct = total = 0
for shard in shards:
    tar = tarfile.open(shard)
    for name in tar.getnames():
        if not name.endswith(".png"):
            continue
        key = name[:-4]
        meta = json.loads(tar.extractfile(key + ".json").read())
        question = meta["conversations"][0]["value"].replace("<image>", "").strip()
        reference = meta["conversations"][1]["value"]
        image = Image.open(io.BytesIO(tar.extractfile(name).read())).convert("RGB")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=image, text=text, return_tensors="pt")
        with torch.no_grad():
            new = model.generate(**inputs, max_new_tokens=8)[:, inputs["input_ids"].shape[1]:]
        answer = processor.decode(new[0], skip_special_tokens=True).strip()
        total += 1
        correct += answer.lower().strip(" .") == reference
        same += answer == ours[key]["answer"]
assert "mmdist" not in sys.modules
print(json.dumps({"samples": total, "same_answer_as_mmdist": same, "transformers_accuracy": correct / total}))
