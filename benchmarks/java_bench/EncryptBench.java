import cape.crypto.Envelope;
import java.security.KeyPairGenerator;
import java.security.SecureRandom;
import java.security.interfaces.RSAPublicKey;
import java.util.ArrayList;
import java.util.List;
import javax.crypto.Cipher;
import javax.crypto.spec.GCMParameterSpec;
import javax.crypto.spec.SecretKeySpec;

/**
 * Java SDK encrypt throughput ({@code cape:} envelope: RSA-OAEP-4096 key wrap + AES-256-GCM)
 * beside the JDK's raw AES-256-GCM on the same buffer, in the same JVM and run.
 *
 * <p>Usage: {@code java -cp … EncryptBench REPEATS SIZE…}; prints one JSON object per size:
 * {@code {"size": n, "envelope_s": [...], "aes_gcm_s": [...]}} (seconds per repeat).
 */
public final class EncryptBench {
    private EncryptBench() {}

    public static void main(String[] args) throws Exception {
        int repeats = Integer.parseInt(args[0]);
        double warmupSeconds = Double.parseDouble(System.getProperty("warmup.seconds", "3"));
        KeyPairGenerator generator = KeyPairGenerator.getInstance("RSA");
        generator.initialize(4096);
        RSAPublicKey key = (RSAPublicKey) generator.generateKeyPair().getPublic();
        SecureRandom random = new SecureRandom();
        // Warm up both paths until the JIT has compiled them: AES-GCM's intrinsics need C2,
        // which takes a few hundred MiB through the cipher, not just time.
        long warmupBytes = Long.parseLong(System.getProperty("warmup.bytes", String.valueOf(512L << 20)));
        byte[] warm = new byte[8 << 20];
        long until = System.nanoTime() + (long) (warmupSeconds * 1e9);
        for (long done = 0; done < warmupBytes || System.nanoTime() < until; done += warm.length) {
            Envelope.seal(warm, key);
            rawGcm(warm, random);
        }
        for (int i = 1; i < args.length; i++) {
            int size = Integer.parseInt(args[i]);
            byte[] data = new byte[size];
            random.nextBytes(data);
            // Small inputs: time a batch per sample (about 1 MiB of input), report per call.
            int batch = Math.max(1, (1 << 20) / size);
            Envelope.seal(data, key);
            rawGcm(data, random);
            List<Double> envelope = new ArrayList<>();
            List<Double> raw = new ArrayList<>();
            for (int r = 0; r < repeats; r++) {
                long start = System.nanoTime();
                for (int b = 0; b < batch; b++) {
                    byte[] sealed = Envelope.seal(data, key);
                    if (sealed.length != size + 512 + 12 + 16) {
                        throw new IllegalStateException("unexpected envelope length " + sealed.length);
                    }
                }
                envelope.add((System.nanoTime() - start) / 1e9 / batch);
                start = System.nanoTime();
                for (int b = 0; b < batch; b++) {
                    rawGcm(data, random);
                }
                raw.add((System.nanoTime() - start) / 1e9 / batch);
            }
            System.out.println("{\"size\": " + size + ", \"envelope_s\": " + envelope + ", \"aes_gcm_s\": " + raw + "}");
        }
    }

    /** The reference: one AES-256-GCM encryption of the whole buffer, fresh key and nonce. */
    private static byte[] rawGcm(byte[] data, SecureRandom random) throws Exception {
        byte[] key = new byte[32];
        byte[] nonce = new byte[12];
        random.nextBytes(key);
        random.nextBytes(nonce);
        Cipher gcm = Cipher.getInstance("AES/GCM/NoPadding");
        gcm.init(Cipher.ENCRYPT_MODE, new SecretKeySpec(key, "AES"), new GCMParameterSpec(128, nonce));
        return gcm.doFinal(data);
    }
}
