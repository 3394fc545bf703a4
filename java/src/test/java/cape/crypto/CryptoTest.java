package cape.crypto;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import cape.errors.DecryptionException;
import cape.errors.KeyFormatException;
import cape.errors.MalformedEnvelopeException;
import java.nio.charset.StandardCharsets;
import java.security.KeyPair;
import java.security.KeyPairGenerator;
import java.security.interfaces.RSAPublicKey;
import java.security.spec.MGF1ParameterSpec;
import java.util.Arrays;
import java.util.Base64;
import javax.crypto.Cipher;
import javax.crypto.spec.GCMParameterSpec;
import javax.crypto.spec.OAEPParameterSpec;
import javax.crypto.spec.PSource;
import javax.crypto.spec.SecretKeySpec;
import org.bouncycastle.crypto.params.X25519PrivateKeyParameters;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;

/** The envelope's layout and the result channel's refusals (cross-language: the live tests). */
class CryptoTest {
    private static KeyPair rsa;

    @BeforeAll
    static void key() throws Exception {
        KeyPairGenerator generator = KeyPairGenerator.getInstance("RSA");
        generator.initialize(4096);
        rsa = generator.generateKeyPair();
    }

    /** Open an envelope with the JDK alone, exactly as the layout says. */
    private static byte[] open(byte[] raw) throws Exception {
        Cipher oaep = Cipher.getInstance("RSA/ECB/OAEPPadding");
        oaep.init(Cipher.DECRYPT_MODE, rsa.getPrivate(), new OAEPParameterSpec(
                "SHA-256", "MGF1", MGF1ParameterSpec.SHA256, PSource.PSpecified.DEFAULT));
        byte[] dek = oaep.doFinal(Arrays.copyOfRange(raw, 0, 512));
        assertEquals(32, dek.length);
        Cipher gcm = Cipher.getInstance("AES/GCM/NoPadding");
        gcm.init(Cipher.DECRYPT_MODE, new SecretKeySpec(dek, "AES"),
                new GCMParameterSpec(128, Arrays.copyOfRange(raw, 512, 524)));
        return gcm.doFinal(raw, 524, raw.length - 524);
    }

    @Test
    void envelopeLayoutIsCapes() throws Exception {
        RSAPublicKey key = (RSAPublicKey) rsa.getPublic();
        byte[] raw = Envelope.seal("hello".getBytes(StandardCharsets.US_ASCII), key);
        assertEquals(545, raw.length); // 512 + 12 + 5 + 16, as protocol.md says
        assertEquals("hello", new String(open(raw), StandardCharsets.US_ASCII));

        byte[] binary = Envelope.encrypt(new byte[0], key);
        assertEquals("cape:", new String(binary, 0, 5, StandardCharsets.US_ASCII));
        assertEquals(0, open(Arrays.copyOfRange(binary, 5, binary.length)).length);

        byte[] text = Envelope.encryptText("x".getBytes(StandardCharsets.US_ASCII), key);
        String form = new String(text, StandardCharsets.US_ASCII);
        assertTrue(form.startsWith("cape:"));
        assertEquals("x", new String(open(Base64.getDecoder().decode(form.substring(5))), StandardCharsets.US_ASCII));
    }

    @Test
    void envelopesAreFreshEachTime() {
        RSAPublicKey key = (RSAPublicKey) rsa.getPublic();
        byte[] a = Envelope.seal(new byte[16], key);
        byte[] b = Envelope.seal(new byte[16], key);
        assertTrue(!Arrays.equals(Arrays.copyOfRange(a, 512, 524), Arrays.copyOfRange(b, 512, 524)));
    }

    @Test
    void smallOrForeignKeysAreRefused() throws Exception {
        KeyPairGenerator small = KeyPairGenerator.getInstance("RSA");
        small.initialize(1024);
        KeyFormatException tooSmall = assertThrows(KeyFormatException.class,
                () -> Envelope.loadPublicKey(small.generateKeyPair().getPublic().getEncoded()));
        assertTrue(tooSmall.getMessage().contains("at least 2048 bits"));
        KeyFormatException ec = assertThrows(KeyFormatException.class, () -> Envelope.loadPublicKey(
                KeyPairGenerator.getInstance("EC").generateKeyPair().getPublic().getEncoded()));
        assertTrue(ec.getMessage().contains("expected an RSA public key"));
        KeyFormatException junk = assertThrows(KeyFormatException.class, () -> Envelope.loadPublicKey(new byte[300]));
        assertTrue(junk.getMessage().contains("not a valid DER"));
    }

    @Test
    void resultChannelOpensOnlyItsOwnReplyNumberAndKind() {
        X25519PrivateKeyParameters enclave = new X25519PrivateKeyParameters(new java.security.SecureRandom());
        X25519PrivateKeyParameters response = ResultChannel.responseKey();
        ResultChannel client = ResultChannel.forClient(response, enclave.generatePublicKey().getEncoded());
        byte[] sealed = client.seal(3, "out".getBytes(StandardCharsets.US_ASCII), ResultChannel.RESULT);
        assertArrayEquals("out".getBytes(StandardCharsets.US_ASCII), client.open(3, sealed, ResultChannel.RESULT));
        assertEquals(ResultChannel.DECRYPTION_FAILED,
                assertThrows(DecryptionException.class, () -> client.open(2, sealed, ResultChannel.RESULT)).getMessage());
        assertThrows(DecryptionException.class, () -> client.open(3, sealed, ResultChannel.ERROR));
        ResultChannel other = ResultChannel.forClient(ResultChannel.responseKey(), enclave.generatePublicKey().getEncoded());
        assertThrows(DecryptionException.class, () -> other.open(3, sealed, ResultChannel.RESULT));
        assertThrows(MalformedEnvelopeException.class, () -> client.open(0, new byte[15], ResultChannel.RESULT));
    }

    @Test
    void unusableSessionKeysAreRefused() {
        assertThrows(KeyFormatException.class, () -> ResultChannel.forClient(ResultChannel.responseKey(), new byte[31]));
        assertThrows(KeyFormatException.class, () -> ResultChannel.forClient(ResultChannel.responseKey(), new byte[32]));
        assertThrows(KeyFormatException.class, () -> Hpke.seal(new byte[32], new byte[1]));
        assertTrue(assertThrows(KeyFormatException.class, () -> Hpke.seal(new byte[300], new byte[1]))
                .getMessage().contains("32 bytes, not 300"));
    }

    @Test
    void hpkeFramesAreEncPlusCiphertextAndFresh() {
        byte[] recipient = ResultChannel.responseKey().generatePublicKey().getEncoded();
        byte[] a = Hpke.seal(recipient, "input".getBytes(StandardCharsets.US_ASCII));
        byte[] b = Hpke.seal(recipient, "input".getBytes(StandardCharsets.US_ASCII));
        assertEquals(32 + 5 + 16, a.length);
        assertTrue(!Arrays.equals(a, b));
    }
}
