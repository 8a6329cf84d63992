// The page of the Kuzushiji service. It calls the service's own HTTP APIs, nothing else:
// GET /version, POST /predict (one image), POST /predict_batch (several) and POST /glyph (the 28x28
// glyph the model reads). Errors are the service's own messages, shown as they come.
"use strict";

(() => {
  const TOP_K = 5;
  // The service crops a drawing to its ink and scales it to a 24 px box: with strokes 1/12 of the pad, a
  // character that fills most of the pad becomes strokes about 2 px wide, like the dataset's brush.
  const STROKE_RATIO = 1 / 12;
  const LIVE_DELAY_MS = 400; // quiet time after a stroke before reading while writing
  const GLYPH_READS_AT_ONCE = 4; // /glyph calls in flight for a table of files

  const $ = (id) => document.getElementById(id);
  const pad = $("pad");
  const ink = pad.getContext("2d");
  const strokes = [];
  let stroke = null; // the stroke being written
  let topK = TOP_K;
  let classCount = 49; // from /version: "one of the 49 kana" (10 for a KMNIST model)
  let liveTimer = null;
  let pending = 0; // requests in flight, for aria-busy
  let singleId = 0; // a newer single read makes an older answer stale
  let batchId = 0;

  // ------------------------------------------------------------------------------------ helpers

  function el(tag, className, text, attributes) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, value);
    return node;
  }

  function percent(probability) {
    return probability < 0.001 ? "<0.1%" : `${(probability * 100).toFixed(1)}%`;
  }

  function setBusy() {
    $("answer").setAttribute("aria-busy", String(pending > 0 || liveTimer !== null));
  }

  function say(text) {
    $("status").textContent = text;
  }

  function sayBatch(text) {
    $("batch-status").textContent = text;
  }

  // An <img> showing a Blob; the previous object URL is released.
  function showBlob(img, blob) {
    if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
    img.src = URL.createObjectURL(blob);
  }

  function form(field, files) {
    const data = new FormData();
    for (const file of files) data.append(field, file, file.name || "drawing.png");
    data.append("top_k", String(topK));
    return data;
  }

  // POST to the service: {body} on success, {error: {code, message, status}} otherwise.
  async function post(path, data) {
    pending += 1;
    setBusy();
    try {
      const response = await fetch(path, { method: "POST", body: data });
      if (response.ok) {
        const json = (response.headers.get("content-type") || "").includes("json");
        return { body: json ? await response.json() : await response.blob() };
      }
      return { error: await problem(response) };
    } catch (failure) {
      return { error: { code: "network", message: `the service did not answer (${failure.message})` } };
    } finally {
      pending -= 1;
      setBusy();
    }
  }

  async function problem(response) {
    const text = await response.text();
    try {
      const error = JSON.parse(text).error;
      if (error && error.message) return { ...error, status: response.status };
    } catch (notJson) {
      // not the service's JSON error (a proxy, a crash): show the raw text below
    }
    return { code: "http", status: response.status, message: text.trim() || response.statusText };
  }

  function glyphOf(file) {
    const data = new FormData();
    data.append("image", file, file.name || "drawing.png");
    return post("/glyph", data);
  }

  function showError(error) {
    const box = $("error");
    const where = [error.code, error.status && `HTTP ${error.status}`].filter(Boolean).join(" · ");
    box.replaceChildren(el("span", "message", error.message), el("br"), el("code", "", where));
    box.hidden = false;
  }

  // ------------------------------------------------------------------------------- one image

  function scoreItem(score) {
    const item = el("li");
    const bar = el("span", "bar", undefined, { "aria-hidden": "true" });
    const fill = el("span");
    fill.style.width = `${Math.min(100, score.probability * 100).toFixed(1)}%`;
    bar.append(fill);
    item.append(
      el("span", "char", score.char, { lang: "ja" }),
      el("span", "reading", score.reading || ""),
      el("span", "codepoint", `${score.codepoint} · class ${score.index}`),
      el("span", "percent", percent(score.probability)),
      bar,
    );
    return item;
  }

  // "あ (a)": a kana with its modern reading, for a reader who does not read kuzushiji.
  function named(score) {
    return score.reading ? `${score.char} (${score.reading})` : score.char;
  }

  const NOT_A_KANA = () => `This does not look like one of the ${classCount} kana`;

  // What the answer means, in words: {kind: "sure" | "unsure" | "outside" | "", text}. A model without
  // thresholds (confident null) gets no verdict, only its guesses.
  function verdictOf(answer) {
    const guesses = answer.predictions.map(named).join(", ");
    if (answer.in_domain === false) return { kind: "outside", text: `${NOT_A_KANA()}: ${answer.reason}.` };
    if (answer.confident === false) return { kind: "unsure", text: `Not sure — the top guesses are ${guesses}` };
    if (answer.confident === true) return { kind: "sure", text: `It reads ${named(answer.predictions[0])}` };
    return { kind: "", text: "" };
  }

  function showVerdict(verdict) {
    const box = $("verdict");
    box.className = `verdict ${verdict.kind}`;
    box.textContent = verdict.text;
    box.hidden = !verdict.text;
  }

  async function readOne(file, name) {
    const id = ++singleId;
    const started = performance.now();
    say(`Reading ${name}…`);
    const [answer, glyph] = await Promise.all([post("/predict", form("image", [file])), glyphOf(file)]);
    if (id !== singleId) return; // a newer read is on its way
    if (answer.error && answer.error.code === "blank_image") {
      // Nothing drawn (an empty pad, an all-white or a 1x1 image): not a kana, not a fault.
      $("result").hidden = true;
      $("error").hidden = true;
      showVerdict({ kind: "outside", text: `${NOT_A_KANA()}: ${answer.error.message}` });
      say(`${name}: nothing to read`);
      return;
    }
    if (answer.error) {
      $("result").hidden = true;
      $("verdict").hidden = true;
      showError(answer.error);
      say(`${name}: not read`);
      return;
    }
    $("error").hidden = true;
    const verdict = verdictOf(answer.body);
    showVerdict(verdict);
    $("top").className = verdict.kind === "sure" || !verdict.kind ? "scores" : "scores tentative";
    showBlob($("source"), file);
    if (glyph.body) showBlob($("glyph"), glyph.body);
    else showError(glyph.error);
    $("top").replaceChildren(...answer.body.predictions.map(scoreItem));
    $("version").textContent = answer.body.model_version;
    $("result").hidden = false;
    say(`${name}: read in ${Math.round(performance.now() - started)} ms`);
  }

  // --------------------------------------------------------------------------- several images

  function fillTop(cell, result) {
    const verdict = verdictOf(result);
    const top = el("div", "top");
    if (verdict.kind === "outside") top.append(el("span", "verdict outside", "not a kana"));
    else if (verdict.kind === "unsure") top.append(el("span", "verdict unsure", "not sure:"));
    for (const score of result.predictions) {
      const item = el("span", "", undefined, { title: `${score.codepoint} · class ${score.index}` });
      const reading = score.reading ? ` ${score.reading}` : "";
      item.append(el("b", "", score.char, { lang: "ja" }), `${reading} ${percent(score.probability)}`);
      top.append(item);
    }
    cell.replaceChildren(top);
  }

  async function readMany(files) {
    const id = ++batchId;
    const rows = files.map((file) => {
      const row = el("tr");
      const sent = el("img", "", undefined, { alt: `${file.name} as sent` });
      showBlob(sent, file);
      const glyph = el("img", "glyph", undefined, { alt: `${file.name} as the model reads it` });
      const sentCell = el("td");
      sentCell.append(sent);
      const glyphCell = el("td");
      glyphCell.append(glyph);
      row.append(el("td", "name", file.name), sentCell, glyphCell, el("td", "answer", "reading…"));
      return row;
    });
    $("rows").replaceChildren(...rows);
    $("batch").hidden = false;
    sayBatch(`Reading ${files.length} files…`);

    const glyphs = (async () => {
      for (let start = 0; start < files.length; start += GLYPH_READS_AT_ONCE) {
        const chunk = files.slice(start, start + GLYPH_READS_AT_ONCE);
        const answers = await Promise.all(chunk.map(glyphOf));
        if (id !== batchId) return;
        answers.forEach((glyph, offset) => {
          const img = rows[start + offset].querySelector("img.glyph");
          if (glyph.body) showBlob(img, glyph.body);
          else img.replaceWith(el("span", "quiet", "—"));
        });
      }
    })();
    const answer = await post("/predict_batch", form("images", files));
    await glyphs;
    if (id !== batchId) return;
    if (answer.error) {
      showError(answer.error);
      rows.forEach((row, index) => {
        const cell = row.querySelector("td.answer");
        cell.className = "answer failed";
        cell.textContent = index === answer.error.index ? answer.error.message : "not read: the request was refused";
      });
      sayBatch(`${files.length} files: not read`);
      return;
    }
    $("error").hidden = true;
    answer.body.results.forEach((result, index) => fillTop(rows[index].querySelector("td.answer"), result));
    sayBatch(`${files.length} files read · model version ${answer.body.model_version}`);
  }

  function readFiles(list) {
    const files = [...list];
    if (files.length === 1) readOne(files[0], files[0].name || "pasted image");
    else if (files.length > 1) readMany(files);
  }

  // ------------------------------------------------------------------------------- the pad

  function paint() {
    ink.fillStyle = "#fff"; // white paper, black ink: the service turns it into the dataset's white on black
    ink.fillRect(0, 0, pad.width, pad.height);
    ink.strokeStyle = "#000";
    ink.lineWidth = pad.width * STROKE_RATIO;
    ink.lineCap = "round";
    ink.lineJoin = "round";
    for (const points of strokes) {
      ink.beginPath();
      ink.moveTo(points[0].x, points[0].y);
      for (const point of points) ink.lineTo(point.x, point.y); // a lone point draws a dot (round caps)
      ink.stroke();
    }
  }

  function padPoint(event) {
    const box = pad.getBoundingClientRect();
    return {
      x: ((event.clientX - box.left) * pad.width) / box.width,
      y: ((event.clientY - box.top) * pad.height) / box.height,
    };
  }

  function cancelLive() {
    clearTimeout(liveTimer);
    liveTimer = null;
    setBusy();
  }

  function scheduleLive() {
    cancelLive();
    if (!$("live").checked || strokes.length === 0) return;
    liveTimer = setTimeout(() => {
      liveTimer = null;
      readPad();
    }, LIVE_DELAY_MS);
    setBusy();
  }

  function readPad() {
    cancelLive();
    // Sent as it is, even blank: the service says when there is nothing to read.
    pad.toBlob((blob) => readOne(new File([blob], "drawing.png", { type: "image/png" }), "drawing"), "image/png");
  }

  function resetAnswer() {
    singleId += 1; // answers still on their way are stale
    $("result").hidden = true;
    $("error").hidden = true;
    $("verdict").hidden = true;
    say("Write a character or choose an image.");
  }

  function undo() {
    strokes.pop();
    paint();
    if (strokes.length) scheduleLive();
    else {
      cancelLive();
      resetAnswer();
    }
  }

  function clear() {
    strokes.length = 0;
    paint();
    cancelLive();
    resetAnswer();
  }

  pad.addEventListener("pointerdown", (event) => {
    if (event.button !== 0) return;
    event.preventDefault();
    pad.setPointerCapture(event.pointerId);
    cancelLive();
    stroke = [padPoint(event)];
    strokes.push(stroke);
    paint();
  });
  pad.addEventListener("pointermove", (event) => {
    if (!stroke) return;
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
    for (const each of events.length ? events : [event]) stroke.push(padPoint(each));
    paint();
  });
  const endStroke = () => {
    if (!stroke) return;
    stroke = null;
    scheduleLive();
  };
  pad.addEventListener("pointerup", endStroke);
  pad.addEventListener("pointercancel", endStroke);

  // --------------------------------------------------------------------------- controls

  $("read").addEventListener("click", readPad);
  $("undo").addEventListener("click", undo);
  $("clear").addEventListener("click", clear);
  $("choose").addEventListener("click", () => $("files").click());
  $("files").addEventListener("change", (event) => {
    readFiles(event.target.files);
    event.target.value = ""; // the same file chosen again is read again
  });

  document.addEventListener("keydown", (event) => {
    if (event.target.closest && event.target.closest("input, textarea, select")) return;
    if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "z") {
      event.preventDefault();
      undo();
    } else if (event.key === "Escape") {
      clear();
    } else if (event.key === "Enter" && event.target === pad) {
      event.preventDefault();
      readPad();
    }
  });

  const drop = $("drop");
  const carriesFiles = (event) => event.dataTransfer && [...event.dataTransfer.types].includes("Files");
  document.addEventListener("dragover", (event) => {
    if (!carriesFiles(event)) return;
    event.preventDefault(); // allows the drop anywhere on the page
    drop.classList.add("over");
  });
  document.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) drop.classList.remove("over");
  });
  document.addEventListener("drop", (event) => {
    if (!carriesFiles(event)) return;
    event.preventDefault();
    drop.classList.remove("over");
    readFiles(event.dataTransfer.files);
  });
  document.addEventListener("paste", (event) => {
    const files = event.clipboardData ? [...event.clipboardData.files] : [];
    if (!files.length) return;
    event.preventDefault();
    readFiles(files);
  });

  // ---------------------------------------------------------------------------- start

  paint();
  setBusy();
  fetch("/version")
    .then((response) => (response.ok ? response.json() : null))
    .then((info) => {
      if (!info) return;
      if (info.num_classes) topK = Math.min(TOP_K, info.num_classes);
      if (info.num_classes) classCount = info.num_classes;
      const parts = [`Model version ${info.registry_version}`];
      if (info.dataset) parts.push(`trained on ${info.dataset}`);
      if (info.num_classes) parts.push(`${info.num_classes} classes`);
      $("model-info").textContent = parts.join(" · ");
    })
    .catch(() => {}); // the answers still carry the model version
})();
