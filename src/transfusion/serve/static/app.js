// The demo page: plain JavaScript, no framework, nothing loaded from elsewhere. Talks to the JSON/PNG API.
"use strict";

const $ = (id) => document.getElementById(id);

function setStatus(id, text, isError = false) {
  const el = $(id);
  el.textContent = text;
  el.classList.toggle("error", isError);
}

async function errorText(resp) {
  try { return `${resp.status}: ${(await resp.json()).detail}`; } catch { return `${resp.status} ${resp.statusText}`; }
}

function numberOrNull(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

// Server-sent events on a POST, read with fetch so that a refusal (400/429) keeps its status code.
async function* readEvents(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const ev = { event: "message", data: "" };
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) ev.event = line.slice(7);
        else if (line.startsWith("data: ")) ev.data += line.slice(6);
      }
      yield { event: ev.event, data: JSON.parse(ev.data) };
    }
  }
}

$("draw-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const body = { prompt: $("draw-prompt").value, seed: Number($("draw-seed").value || 0) };
  const steps = numberOrNull("draw-steps"), cfg = numberOrNull("draw-cfg");
  if (steps !== null) body.steps = steps;
  if (cfg !== null) body.cfg = cfg;
  $("draw-go").disabled = true;
  $("draw-progress").value = 0;
  setStatus("draw-status", "queued…");
  try {
    const resp = await fetch("/api/image", {
      method: "POST", headers: { "Content-Type": "application/json", "Accept": "text/event-stream" },
      body: JSON.stringify(body),
    });
    if (!resp.ok) { setStatus("draw-status", await errorText(resp), true); return; }
    for await (const ev of readEvents(resp)) {
      if (ev.event === "progress") {
        $("draw-progress").max = ev.data.total;
        $("draw-progress").value = ev.data.step;
        setStatus("draw-status", `denoising step ${ev.data.step} / ${ev.data.total}`);
      } else if (ev.event === "image") {
        $("draw-image").src = "data:image/png;base64," + ev.data.png;
        $("draw-image").hidden = false;
        setStatus("draw-status", "done");
      } else if (ev.event === "error") {
        setStatus("draw-status", `${ev.data.status}: ${ev.data.detail}`, true);
      }
    }
  } catch (err) {
    setStatus("draw-status", String(err), true);
  } finally {
    $("draw-go").disabled = false;
  }
});

$("caption-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const form = new FormData();
  form.append("image", $("caption-file").files[0]);
  setStatus("caption-status", "captioning…");
  $("caption-text").textContent = "";
  const resp = await fetch("/api/caption", { method: "POST", body: form });
  if (!resp.ok) { setStatus("caption-status", await errorText(resp), true); return; }
  $("caption-text").textContent = (await resp.json()).caption;
  setStatus("caption-status", "done");
});

$("edit-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const form = new FormData();
  form.append("image", $("edit-file").files[0]);
  form.append("instruction", $("edit-instruction").value);
  setStatus("edit-status", "editing…");
  const resp = await fetch("/api/edit", { method: "POST", body: form });
  if (!resp.ok) { setStatus("edit-status", await errorText(resp), true); return; }
  $("edit-image").src = URL.createObjectURL(await resp.blob());
  $("edit-image").hidden = false;
  setStatus("edit-status", "done");
});

$("generate-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const out = $("generate-output");
  out.textContent = "";
  setStatus("generate-status", "generating…");
  const body = { prompt: $("generate-prompt").value, max_new_tokens: Number($("generate-tokens").value || 64) };
  const resp = await fetch("/api/generate", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  if (!resp.ok) { setStatus("generate-status", await errorText(resp), true); return; }
  out.append(document.createTextNode(body.prompt));
  for (const piece of (await resp.json()).pieces) {
    if (piece.type === "text") out.append(document.createTextNode(piece.text));
    else { const img = document.createElement("img"); img.src = "data:image/png;base64," + piece.png; out.append(img); }
  }
  setStatus("generate-status", "done");
});

// Show the chosen file before it is sent (it never leaves the browser until the button is pressed).
for (const [input, preview] of [["caption-file", "caption-preview"], ["edit-file", "edit-preview"]]) {
  $(input).addEventListener("change", () => {
    const file = $(input).files[0];
    if (file) { $(preview).src = URL.createObjectURL(file); $(preview).hidden = false; }
  });
}

fetch("/health").then((r) => r.json()).then((h) => {
  const m = h.model;
  $("model-info").textContent = `Model: ${m.checkpoint} (${m.image_size}×${m.image_size}, ${m.prediction}, ` +
    `${m.sampler} ${m.sample_steps} steps, CFG ${m.cfg_scale}).`;
}).catch(() => { $("model-info").textContent = "health check failed"; });
