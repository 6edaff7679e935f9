// The example's script, an ES module (.mjs): it marks the page as loaded. nginx sends it as JavaScript and
// compresses it for clients that accept gzip; without a fingerprint in its name it is cached for an hour.
const ready = () => {
  document.documentElement.dataset.loaded = "yes";
  for (const link of document.querySelectorAll("a[href^='/']")) {
    link.title = `On this site: ${link.getAttribute("href")}`;
  }
};
if (document.readyState === "loading") {
  document.addEventListener("DOMContentLoaded", ready);
} else {
  ready();
}
