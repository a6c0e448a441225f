// The reference for toap_kit.recognizers.tfjs: run a TF.js graph model with TensorFlow.js itself
// (pure-JS @tensorflow/tfjs, CPU backend) and write the asked outputs as JSON.
//   node tfjs_reference.js MODEL_JSON INPUT_F32 N H W OUTPUT[,OUTPUT...] OUT_JSON
// INPUT_F32: N x H x W x 3 little-endian float32. @tensorflow/tfjs must be resolvable (NODE_PATH).
const tf = require('@tensorflow/tfjs');
const fs = require('fs');
const path = require('path');

async function main() {
  const [modelJson, inputFile, n, h, w, outputs, outFile] = process.argv.slice(2);
  const spec = JSON.parse(fs.readFileSync(modelJson));
  const shards = spec.weightsManifest.flatMap(g => g.paths.map(p => fs.readFileSync(path.join(path.dirname(modelJson), p))));
  const all = Buffer.concat(shards);
  const model = await tf.loadGraphModel(tf.io.fromMemory({
    modelTopology: spec.modelTopology,
    weightSpecs: spec.weightsManifest.flatMap(g => g.weights),
    weightData: all.buffer.slice(all.byteOffset, all.byteOffset + all.byteLength),
  }));
  const raw = fs.readFileSync(inputFile);
  const x = tf.tensor4d(new Float32Array(raw.buffer, raw.byteOffset, raw.byteLength / 4), [+n, +h, +w, 3]);
  const names = outputs.split(',');
  let ys = model.execute(x, names);
  ys = Array.isArray(ys) ? ys : [ys];
  const res = {backend: tf.getBackend(), version: tf.version.tfjs};
  names.forEach((name, i) => { res[name] = {shape: ys[i].shape, data: Array.from(ys[i].dataSync())}; });
  fs.writeFileSync(outFile, JSON.stringify(res));
}

main().catch(e => { console.error(e.message || e); process.exit(1); });
